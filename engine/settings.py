"""Every setting of the loop: the flags, the AUTORESEARCH_* numbers the user may export, their defaults."""
import argparse
import os
import re
from dataclasses import dataclass

from engine.util import HarnessError, RESULTS, num


# qwen2.5-coder:7b: ~4.7 GB quantized, so it fits next to a 15 GB training run on a 24 GB GPU, it is
# trained for tool calling, and it answers a ~6K-token prompt in seconds. Bigger models can be passed.
DEFAULT_MODEL = "qwen2.5-coder:7b"


DEFAULT_HOST = "http://127.0.0.1:11434"


@dataclass(frozen=True)
class Var:
    """An AUTORESEARCH_* variable: its default where unset or empty ("": none), how it is checked, what it means. The
    README's table is env_table() word for word (tests/test_readme.py)."""
    name: str
    default: str
    kind: str       # count (a whole number above 0), size (16g, 500m), cores, tolerance, or text
    meaning: str


ENV = {v.name: v for v in (
    Var("AUTORESEARCH_TIME_BUDGET", "300", "count", "training seconds (train.py's schedules follow the fraction of it "
        "used)"),
    Var("AUTORESEARCH_GRACE", "120", "count", "seconds on top of the budget for start-up and export before the "
        "training container is killed (the harness passes candidates their allowance + 10 s)"),
    Var("AUTORESEARCH_HANDOFF_SIZE", "2g", "size", "size of the hand-off tmpfs and the largest file `train.py` may "
        "write (1000 files at most)"),
    Var("AUTORESEARCH_EVAL_TIMEOUT", "600", "count", "hard limit for the evaluation container, seconds"),
    Var("AUTORESEARCH_BATCH_TOLERANCE", "0", "tolerance", "how far a row's output may move when its batch-mates "
        "change, relative to its norm; 0: not one bit (see the trust boundary's batch independence). Only for "
        "hardware that does not repeat its results"),
    Var("AUTORESEARCH_MEMORY", "16g", "size", "`podman --memory` (no swap on top); an OOM kill is reported as such. "
        "The loop checks that what its runs may hold at once fits the host (see [The sandbox](#the-sandbox))"),
    Var("AUTORESEARCH_PIDS", "1024", "count", "`podman --pids-limit` (threads count too)"),
    Var("AUTORESEARCH_SHM_SIZE", "2g", "size", "`podman --shm-size`, for data-loader workers"),
    Var("AUTORESEARCH_GPUS", "all", "text", "GPU ids passed as `--device nvidia.com/gpu=ID`, used when `nvidia-smi` "
        "and an NVIDIA CDI spec exist"),
    Var("AUTORESEARCH_IMAGE", "", "text", "unset: the image built from `Containerfile`; `host`: the host's root "
        "filesystem as a throw-away overlay; any other value: that image"),
    Var("AUTORESEARCH_SANDBOX", "", "text", "`none`: run without podman, development only, with a loud warning"),
    Var("AUTORESEARCH_DATA", "data", "text", "the data cache"),
    Var("AUTORESEARCH_RUN_DIR", "runs/last", "text", "host directory for the model hand-off (the harness uses "
        "`runs/<experiment>`)"),
    Var("AUTORESEARCH_WEIGHTS", "weights", "text", "pretrained-weights cache, mounted read-only with HF offline mode"),
    Var("AUTORESEARCH_SEED", "", "text", "seed passed to train.py (the harness sets it for noise runs)"),
    Var("AUTORESEARCH_PODMAN_ARGS", "", "text", "replaces the detected podman set-up flags (see below)"),
    Var("AUTORESEARCH_SLURM_ARGS", "", "text", "site options for `--launcher slurm` (partition, account, ...)"),
    Var("AUTORESEARCH_CPUS", "", "cores", "cores for each container (`podman --cpus`) and its `OMP_NUM_THREADS`; "
        "`--workers N` sets cores/N on a CPU-only machine"),
)}


CHECKS = {  # kind: (the pattern a value must match, what to write instead)
    "count": (r"[1-9][0-9]*", "a whole number above 0"),
    "size": (r"(?=.*[1-9])[0-9]+(\.[0-9]+)?[kmgtKMGT]?", "a size like 16g or 500m"),
    "cores": (r"(?=.*[1-9])[0-9]*\.?[0-9]+", "a positive number of cores like 2 or 0.5"),
    "tolerance": (r"[0-9]*\.?[0-9]+([eE]-?[0-9]+)?", "a number of 0 or more like 1e-4"),
}


def setting(name, environ=os.environ):
    """An AUTORESEARCH_* variable's value: as exported, else its default (empty counts as unset, as in the shell)."""
    return environ.get(name, "").strip() or ENV[name].default


def env_problems(environ=os.environ):
    """Pure. One line for each exported variable that is not what it must be, naming it as the user wrote it."""
    out = []
    for v in ENV.values():
        value = environ.get(v.name, "").strip()
        if value and v.kind in CHECKS and not re.fullmatch(CHECKS[v.kind][0], value):
            out.append(f"{v.name} must be {CHECKS[v.kind][1]}, got {value!r}")
    return out


def env_table():
    """The README's table of the variables."""
    rows = [f"| `{v.name}` | {v.default and f'`{v.default}`'} | {v.meaning} |" for v in ENV.values()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


DEFAULT_BUDGET = int(ENV["AUTORESEARCH_TIME_BUDGET"].default)   # training seconds per run


RUN_GRACE, EVAL_TIMEOUT = int(ENV["AUTORESEARCH_GRACE"].default), int(ENV["AUTORESEARCH_EVAL_TIMEOUT"].default)


MEMORY_RESERVE = 2 << 30          # host memory kept for the harness, Ollama and the system (or 10%, if more)


MEMORY_WAITING = 512 << 20        # what an evaluation container holds while its run trains (torch loaded)


MEMORY_MIN = 256 << 20            # less than this per run trains nothing


def env_int(name, default=None, environ=os.environ):
    """A whole number above 0 from the environment, `default` where unset or empty."""
    v = environ.get(name, "").strip()
    if v and not re.fullmatch(CHECKS["count"][0], v):
        raise HarnessError(f"{name} must be {CHECKS['count'][1]}, got {v!r}")
    return int(v) if v else default


def env_size(name, environ=os.environ):
    """Bytes of a size variable (16g, 500m, 2G, 1048576), its default where unset."""
    v = setting(name, environ)
    if not re.fullmatch(CHECKS["size"][0], v):
        raise HarnessError(f"{name} must be {CHECKS['size'][1]}, got {v!r}")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)", v.lower())
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def check_environment(environ=os.environ):
    """Every variable the user may set for the loop and run.sh, checked before anything changes: one error naming
    the variable as the user wrote it."""
    problems = env_problems(environ)
    if problems:
        raise HarnessError(problems[0])


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):   # no "(default: None)" where the help says what the default is
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A wrong flag is one line, as every other mistake (no usage block)."""
        self.exit(2, f"{self.prog}: error: {message} (python autoresearch.py --help lists the flags)\n")


def _run_flags(p):
    """Which run, who proposes, and how long each experiment trains."""
    p.add_argument("--tag", default=None, help="run on branch autoresearch/TAG; default: today's date, e.g. nov27 "
                                                "(with --resume: the current branch)")
    p.add_argument("--resume", action="store_true", help="continue from results.tsv and the branch")
    p.add_argument("--max-experiments", type=int, default=0, help="model experiments after the baseline, "
                   "counted across resumes, interrupted ones excepted; 0 = until stopped")
    p.add_argument("--agent", choices=("llm", "optuna", "random", "hybrid"), default=None,
                   help="who proposes each experiment: the Ollama model, Optuna's TPE or uniform random samples "
                        "over the search space (program.md's ## Search space, else train.py's constants), or hybrid "
                        "(TPE owns the search space's constants, the model proposes the other trials: code); "
                        "default: llm, with --resume the run's own agent")
    p.add_argument("--tuner-seed", type=int, default=0, help="seed of the optuna and random agents")
    p.add_argument("--workers", type=int, default=1, help="experiments per round, each in its own git worktree and "
                   "slot (a GPU of $AUTORESEARCH_GPUS, or a share of the cores); at most one kept per round")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local", help="where runs execute: here, or "
                   "each as a SLURM job (srun; site options in $AUTORESEARCH_SLURM_ARGS; needs a shared filesystem)")
    p.add_argument("--time-budget", type=int, default=None, help="training seconds per experiment; default: "
                   "$AUTORESEARCH_TIME_BUDGET if exported, else 300 (with --resume: the run's own)")
    p.add_argument("--allowance", type=int, default=None, help="seconds a candidate's training container may run past "
                   "the budget (start-up, data loading, export) before it is invalid; default: max(10%% of the budget, "
                   "30)")
    p.add_argument("--phase-every", type=int, default=10, help="advance the phase after N experiments in it")
    p.add_argument("--phase-plateau", type=int, default=5, help="... or after K experiments without a keep")


def _keep_flags(p):
    """The keep rule (judge.next_step)."""
    p.add_argument("--rule", choices=("screen", "sequential"), default="screen", help="the keep rule: screen (one run "
                   "screens a candidate, two more confirm it; about 1.4 runs a candidate) or sequential (strict: a "
                   "sequential test of up to 10 runs, about 5 a candidate); see judge.next_step")
    p.add_argument("--noise-runs", type=int, default=5, help="runs of the baseline, with different seeds: the first "
                   "measure of the run-to-run noise (at least 2)")


def _model_flags(p):
    """The Ollama model and what it may do in one experiment."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="Ollama model (a 7B coder fits next to training on 24 GB)")
    p.add_argument("--host", default=os.environ.get("OLLAMA_HOST") or DEFAULT_HOST, help="Ollama server")
    p.add_argument("--num-ctx", type=int, default=16384, help="context size sent on every Ollama request")
    p.add_argument("--temperature", type=float, default=0.7, help="the model's sampling temperature")
    p.add_argument("--request-timeout", type=float, default=900, help="seconds per Ollama request")
    p.add_argument("--serve", action="store_true", help="start `ollama serve` if Ollama is not reachable")
    p.add_argument("--fix-attempts", type=int, default=2, help="attempts to fix a crashing experiment")
    p.add_argument("--max-turns", type=int, default=12, help="model replies per experiment")
    p.add_argument("--max-tool-calls", type=int, default=24, help="tool calls per experiment")
    p.add_argument("--max-nudges", type=int, default=2, help="nudges for replies without a tool call")
    p.add_argument("--max-invalid", type=int, default=3, help="rejected run_experiment calls before `invalid`")


def build_parser():
    p = Parser(prog="autoresearch.py", description="An offline research loop: a local LLM served by Ollama improves "
               "a model's metric by itself.",
               formatter_class=Help, epilog="environment (./run.sh and the loop; README: run.sh (environment)):\n" +
               "\n".join(f"  {v.name}={v.default}" for v in ENV.values()))
    _run_flags(p.add_argument_group("the run"))
    _keep_flags(p.add_argument_group("the keep rule"))
    _model_flags(p.add_argument_group("the model (--agent llm, hybrid)"))
    sub = p.add_subparsers(dest="command", title="subcommand")
    rp = sub.add_parser("report", help="progress.png and a summary; see report -h")
    how = rp.add_mutually_exclusive_group()
    how.add_argument("--test", action="store_true", help="also evaluate baseline and best on the test split")
    how.add_argument("--compare", nargs="+", metavar="TAG", help="compare.png and a table for these runs: a tag "
                     "means results.tsv while its branch is checked out, else results-TAG.tsv; or a .tsv path")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    for flag, ok, need in (("--num-ctx", args.num_ctx >= 2048, "at least 2048"),
                           ("--noise-runs", args.noise_runs >= 2, "at least 2 (the noise needs two runs)"),
                           ("--time-budget", args.time_budget is None or args.time_budget >= 1, "at least 1"),
                           ("--workers", args.workers >= 1, "at least 1"),
                           ("--allowance", args.allowance is None or args.allowance >= 1, "at least 1"),
                           ("--max-experiments", args.max_experiments >= 0, "0 (no limit) or more")):
        if not ok:
            p.error(f"{flag} must be {need}, got {getattr(args, flag[2:].replace('-', '_'))}")
    return args


def run_budget(asked, rows):
    """Pure. The training budget: the one asked for (--time-budget, else $AUTORESEARCH_TIME_BUDGET), else a resumed
    run's own, else DEFAULT_BUDGET. A resumed run asked for another budget is refused: its results would not compare."""
    done = next((int(num(r["time_budget"])) for r in reversed(rows) if num(r.get("time_budget"))), None)
    if asked and done and asked != done:
        raise HarnessError(f"{RESULTS} was recorded with a {done}s time budget, not the {asked}s asked for "
                           f"(--time-budget or AUTORESEARCH_TIME_BUDGET): resume with --time-budget {done}, or start "
                           f"a new --tag")
    return asked or done or DEFAULT_BUDGET
