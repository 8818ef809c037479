#!/usr/bin/env python3
"""autoresearch: an offline research loop in which a local LLM (Ollama) improves a model's metric by itself.

    python autoresearch.py [--model M] [--tag NAME] [--max-experiments N] [--resume] [--agent A] [--workers N] ...
    python autoresearch.py report [--test | --compare TAG [TAG ...]]

The loop, step by step (engine/loop.py):
1. Check everything first (engine/settings.py, repo.py, runs.py, agent.py): the flags and AUTORESEARCH_* numbers, one
   loop per repository, a clean git tree, the data, the model in Ollama, the sandbox.
2. Baseline: train.py as it is, --noise-runs times with different seeds, each in the sandbox (./run.sh, engine/runs.py):
   the first best and the run-to-run noise.
3. Each experiment: the agent (the LLM through three tools, engine/agent.py; or a tuner, engine/tuners.py) makes one
   change to train.py and commits it; the sandbox trains it for the fixed budget and the trusted evaluator scores it
   (engine/evaluator.py); the keep rule (engine/judge.py) keeps the commit or reverts it; one row goes to results.tsv
   (engine/results.py), and progress.png is redrawn (engine/report.py).
4. Ctrl-C or kill -9 at any moment: --resume continues from results.tsv and the branch.
"""
import datetime
import os
import re
import signal
import sys

from engine.agent import EDITABLE, LLMAgent, check_model, make_client
from engine.hybrid import Hybrid
from engine.loop import Loop
from engine.project import project_metric
from engine.repo import current_tag, dirty_files, git, git_identity, lock_repo
from engine.report import report
from engine.results import load_results
from engine.runs import check_sandbox, gpu_count, host_memory, on_slurm, run_memory, slurm_startup, worker_slots
from engine.settings import check_environment, env_int, parse_args, run_budget
from engine.tuners import make_tuner
from engine.util import PROGRAM, TRAIN, HarnessError, data_dir, live_clear, read_text


def startup_checks(args, client):
    """Every failure is one message that names the fix (lock_repo has checked that this is a git checkout)."""
    top = git("rev-parse", "--show-toplevel")
    if os.path.realpath(top) != os.path.realpath(os.getcwd()):
        raise HarnessError(f"run autoresearch from the repository root: cd {top}")
    for f in (TRAIN, PROGRAM, "run.sh"):
        if not os.path.exists(f):
            raise HarnessError(f"{f} is missing in {os.getcwd()}")
    project_metric()   # declared, and declared right
    if git("rev-parse", "--verify", "-q", "HEAD", check=False) == "":
        raise HarnessError("the repository has no commit yet: git add -A && git commit -m init")
    dirty = set(dirty_files()) - (set(EDITABLE) if args.resume else set())
    if dirty:
        raise HarnessError("the working tree is not clean (" + ", ".join(sorted(dirty)[:5]) +
                           "): commit or stash your changes first (git status)")
    if not os.path.exists(os.path.join(data_dir(), "meta.json")):
        raise HarnessError(f"no prepared data in {data_dir()}/: run python prepare_data.py")
    if args.agent in ("llm", "hybrid"):   # a tuner agent proposes without a model
        check_model(args, client)
    check_sandbox(args)


def _sigterm(signum, frame):
    raise KeyboardInterrupt   # SIGTERM cleans up exactly like Ctrl-C


def make_agent(args, client):
    """The proposer of --agent: the LLM, a tuner, or the two as a hybrid."""
    metric = project_metric()
    if args.agent in ("optuna", "random"):
        return make_tuner(args, metric)
    llm = LLMAgent(args, client, metric, read_text(PROGRAM))
    return Hybrid(llm, make_tuner(args, metric, "optuna")) if args.agent == "hybrid" else llm


def resources(args):
    """(each worker's slot, a run alone): its memory, and a worker's share of the GPUs or cores. SLURM places each
    run with its own resources (a GPU by --gres, on whichever node runs it)."""
    if on_slurm(args):
        return [{}] * args.workers, {}
    alone, slots = run_memory(1, host_memory()), [{}] * args.workers
    if args.workers > 1:
        mem = run_memory(args.workers, host_memory())
        slots = [{**slot, **mem} for slot in worker_slots(args.workers, os.environ.get("AUTORESEARCH_GPUS"),
                                                          gpu_count(), os.cpu_count())]
    return slots, alone


def research(args):
    """python autoresearch.py: everything checked, then the loop."""
    if args.tag is None:
        args.tag = (current_tag() if args.resume else None) or datetime.date.today().strftime("%b%d").lower()
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        raise HarnessError("--tag may only use letters, digits, '.', '_' and '-'")
    git_identity()
    recorded = load_results() if args.resume else []
    if args.agent is None:   # a resumed run keeps its agent, and its budget
        args.agent = next((r["agent"] for r in reversed(recorded) if r.get("agent")), "llm")
    args.time_budget = run_budget(args.time_budget or env_int("AUTORESEARCH_TIME_BUDGET", None), recorded)
    if args.agent in ("optuna", "random"):
        args.fix_attempts = 0   # nobody to fix a crash: it is a failed trial
    client = make_client(args.host, args.request_timeout) if args.agent in ("llm", "hybrid") else None
    startup_checks(args, client)
    if on_slurm(args):
        slurm_startup(args)
    if args.workers > 1 and args.agent != "llm":
        raise HarnessError(f"--agent {args.agent} proposes one trial at a time: run it with --workers 1")
    Loop(args, make_agent(args, client), *resources(args)).main()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _sigterm)
    # Started as a background job of a script, Python inherits SIGINT ignored; Ctrl-C must still stop us cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = parse_args(argv)
        if args.command == "report" and not args.test:
            return report(args)   # reads only: beside a running loop too
        check_environment()
        lock_repo()               # held until this process ends
        return report(args) if args.command == "report" else research(args) or 0
    except HarnessError as e:
        live_clear()
        print(f"autoresearch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        live_clear()
        print("\nautoresearch: interrupted; the best commit is checked out. Continue with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
