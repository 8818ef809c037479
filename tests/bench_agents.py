"""Benchmark (issue 22): who proposes better experiments at equal compute: a tuner, a model, or both (--agent hybrid)?

    python tests/bench_agents.py --out /tmp/agents                  # the README's CPU figures (about 75 min, 2 cores)
    python tests/bench_agents.py --out /tmp/smoke --budget 3 --trials 2 --seeds 1 --n-train 300 --n-val 100
                                                                    # a smoke run (minutes; its figures mean nothing)
    # on a GPU, with a real model in a real Ollama (ollama serve; ollama pull qwen2.5-coder:7b); no llm_server:
    python tests/bench_agents.py --out /tmp/agents-gpu --host http://127.0.0.1:11434 --model qwen2.5-coder:7b \\
        --num-ctx 16384 --budget 300 --trials 30 --seeds 3 --n-train 8000 --n-val 1000 --n-test 1000

Arms (--arms), each a real `python autoresearch.py` in its own copy of the repository (the committed tree), with the
same --max-experiments (--trials), time budget, --noise-runs and allowance; seed s is the data's --seed s (and
--heldout-seed 1000 + s) and the run's --tuner-seed s; AUTORESEARCH_IMAGE=host unless set:
  random, optuna   --agent random|optuna: the tuners over program.md's ## Search space, no model
  llm              --agent llm: the model alone (--model: by default the real tiny gemma3:270m of tests/llm_server.py,
                   served on loopback and reached through the real ollama client; with --host, that server's model)
  hybrid           --agent hybrid with that model: TPE owns the search space, the model proposes the other trials
  hybrid-capable   --agent hybrid with a scripted capable model (tests/fake_ollama.py): its trials are the known-good
                   code changes of CAPABLE, which the search space cannot express
  capable          --agent llm with that scripted model (not in the default arms)

Each run's results.tsv is kept as OUT/results-<arm>-s<seed>.tsv (an arm-seed whose file exists is not run again, so
an interrupted bench continues with the same --out); then `report --compare` over them all (compare.png), a table
(stdout and OUT/agents.md) and OUT/agents.png: the best so far against trials, one line per arm and seed.
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from bench_research import FILES, constant, line_edit, null  # noqa: E402
from bench_tuners import IDENTITY  # noqa: E402
from conftest import copy_into  # noqa: E402
from engine.agent import TOOL_NAMES, parse_tool_calls  # noqa: E402
from engine.project import project_metric  # noqa: E402
from engine.report import best_so_far, load_test_scores  # noqa: E402
from engine.results import load_results  # noqa: E402
from engine.util import num  # noqa: E402
from fake_ollama import FakeOllama, parse_tool_output, tool_call  # noqa: E402

ARMS = ["random", "optuna", "llm", "hybrid", "hybrid-capable"]
AGENT = {"random": "random", "optuna": "optuna", "llm": "llm", "hybrid": "hybrid", "hybrid-capable": "hybrid",
         "capable": "llm"}
CAPABLE_MODEL = "capable:scripted"   # the scripted model's name; its template writes calls in qwen's <tool_call>


def replace_line(old, new):
    def edit(src):
        assert src.count(old) == 1, old
        return src.replace(old, new)
    return edit


def capable_edits():
    """What the capable model proposes, in order (the CPU preset): code the tuner cannot write. The expert branch off
    is the README's measured gain (-24% mean rank at 120 s on two cores: the branch costs a quarter of the steps); the
    tuner's EXPERT_LOSS_WEIGHT is a continuous range [0, 0.5] that never draws exactly 0, the value that skips the
    branch, and EXPERT_LOSS_PROB is not in its space. The smaller encoders (more steps in the budget) are guesses of
    the same kind, not measured."""
    return [("expert branch off (EXPERT_LOSS_PROB 0): more steps in the budget",
             constant("EXPERT_LOSS_PROB", lambda v: 0.0, False)),
            ("ViT depth 4 -> 2: a smaller image encoder makes more steps",
             replace_line("embed_dim=128, depth=4, num_heads=4)", "embed_dim=128, depth=2, num_heads=4)")),
            ("text encoder 2 -> 1 layer: more steps",
             replace_line("TEXT = dict(dim=128, n_layers=2,", "TEXT = dict(dim=128, n_layers=1,"))]


def capable_model(repo):
    """The scripted capable model (a FakeOllama reply function): a new conversation gets the next edit of
    capable_edits() that still changes the best train.py (then seed-only nulls), an accepted edit gets run_experiment."""
    plan = iter(capable_edits() + [(f"null {k}: the seed only", null(k)) for k in range(1, 100)])
    label = ["none"]

    def reply(req):
        messages = req["messages"]
        if len(messages) > 2:   # after its edit (or a crash): run it
            return tool_call("run_experiment", description=label[0])
        src = open(os.path.join(repo, "train.py")).read()   # the main checkout holds the best commit
        for label[0], edit in plan:
            if edit(src) != src:
                old, new = line_edit(src, edit(src))
                return tool_call("edit_file", path="train.py", old_text=old, new_text=new)
    return reply


# ---------------------------------------------------------------------------------------------------- running arms

def prepare(out, seed, a):
    """Seed s's data, built once: a new training set per seed, and held-out splits of their own."""
    data = os.path.join(out, f"data-s{seed}")
    if not os.path.exists(os.path.join(data, "meta.json")):
        os.makedirs(os.path.join(out, "no-weights"), exist_ok=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", data, "--seed", str(seed),
                        "--heldout-seed", str(1000 + seed), "--n-train", str(a.n_train), "--n-val", str(a.n_val),
                        "--n-test", str(a.n_test), "--weights", os.path.join(out, "no-weights")],
                       check=True, capture_output=True)
    return data


def make_repo(path):
    """A fresh copy of the repository's files with one commit, as a user's checkout."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    copy_into(path, FILES)
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "template"]):
        subprocess.run(["git", *cmd], cwd=path, check=True, capture_output=True, env=dict(os.environ, **IDENTITY))


def model_server(arm, repo, engine, log):
    """The Ollama the arm talks to: None for the tuners and for --host; the scripted capable model; or the real tiny
    model (one engine for all arms, a server each so that each arm's requests are logged apart)."""
    if AGENT[arm] not in ("llm", "hybrid") or (engine is None and "capable" not in arm):
        return None
    if "capable" in arm:
        return FakeOllama({CAPABLE_MODEL: {"family": "qwen2"}}, on_exhausted=capable_model(repo))
    from llm_server import serve
    return serve(engine, log=log)


def run_arm(arm, seed, a, engine, cpus):
    """One arm at one seed through the real autoresearch.py: OUT/results-TAG.tsv, and OUT/stats-TAG.json with its wall
    seconds and the model's requests (when served here)."""
    tag = f"{arm}-s{seed}"
    repo, data, log = os.path.join(a.out, tag), prepare(a.out, seed, a), []
    make_repo(repo)
    env = dict(os.environ, **IDENTITY, AUTORESEARCH_DATA=data, PYTHONUNBUFFERED="1")
    env.setdefault("AUTORESEARCH_IMAGE", "host")
    if cpus:
        env["AUTORESEARCH_CPUS"] = cpus
    flags = ["--agent", AGENT[arm], "--tag", tag, "--tuner-seed", str(seed), "--max-experiments", str(a.trials),
             "--time-budget", str(a.budget), "--noise-runs", str(a.noise_runs), "--allowance", str(a.allowance)]
    if AGENT[arm] in ("llm", "hybrid"):
        flags += ["--model", CAPABLE_MODEL if "capable" in arm else a.model, "--num-ctx", str(a.num_ctx)]
    t0 = time.time()
    with open(os.path.join(a.out, f"{tag}.log"), "w") as out, \
            model_server(arm, repo, engine, log) or contextlib.nullcontext() as server:
        if AGENT[arm] in ("llm", "hybrid"):
            flags += ["--host", server.url if server else a.host]
        p = subprocess.run([sys.executable, "autoresearch.py", *flags], cwd=repo, env=env, stdout=out,
                           stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"{tag} failed (exit {p.returncode}): see {a.out}/{tag}.log")
    shutil.copy(os.path.join(repo, "results.tsv"), os.path.join(a.out, f"results-{tag}.tsv"))
    scores = os.path.join(repo, "test_scores.tsv")
    if os.path.exists(scores):   # report --compare reads them from one file (a repeated header is skipped)
        with open(scores) as f, open(os.path.join(a.out, "test_scores.tsv"), "a") as all_scores:
            all_scores.write(f.read())
    with open(os.path.join(a.out, f"stats-{tag}.json"), "w") as f:
        json.dump({"wall": wall, "requests": log}, f)


def run_all(a, engine):
    """Every arm-seed not run yet, `--parallel` at a time (the seeds of one arm side by side: the same load), each
    run then on cores / parallel."""
    jobs = [(arm, s) for arm in a.arms for s in range(a.seeds)
            if not os.path.exists(os.path.join(a.out, f"results-{arm}-s{s}.tsv"))]
    cpus = str(max(1, (os.cpu_count() or 1) // a.parallel)) if a.parallel > 1 else None
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(a.parallel) as pool:
        for (arm, s), _ in zip(jobs, pool.map(lambda job: run_arm(*job, a, engine, cpus), jobs)):
            print(f"{arm}-s{s} done", flush=True)


# ---------------------------------------------------------------------------------------------------- the report

def figures(rows, test, metric):
    """Pure. One run's figures: baseline, final best (recorded; honest), their test scores, trials and keeps by
    proposer, and the model's failed trials by kind."""
    base, trials = rows[0], [r for r in rows if r["status"] not in ("baseline", "interrupted")]
    best = next(num(r["best"]) for r in reversed(rows) if num(r["best"]) is not None)
    honest = next((num(r.get("honest")) for r in reversed(rows) if num(r.get("honest")) is not None), None)
    best_commit = next((r["commit"] for r in reversed(rows) if r["status"] == "keep"), base["commit"])
    sides = {}
    for r in trials:
        side = sides.setdefault("llm" if r.get("proposer") == "llm" else "tuner", {"trials": 0, "keeps": 0})
        side["trials"] += 1
        side["keeps"] += r["status"] == "keep"
    llm = [r for r in trials if r.get("proposer") == "llm"]
    return {"baseline": num(base["best"]), "best": best, "honest": honest,
            "gain": metric.gain(best, num(base["best"])) / abs(num(base["best"])) * 100,
            "test_base": test.get(base["commit"]), "test_best": test.get(best_commit), "sides": sides,
            "no_call": sum(r["status"] == "invalid" and r["reason"].startswith("no tool call") for r in llm),
            "invalid": sum(r["status"] == "invalid" for r in llm),
            "crash": sum(r["status"] in ("crash", "timeout") for r in llm),
            "model_s": sum(num(r["model_seconds"]) or 0 for r in llm),
            "curve": [(x, y / num(base["best"])) for x, _, y in best_so_far(rows)]}


def requests_text(log):
    """The model's requests: how many, seconds each, and how many replies held a tool call."""
    if not log:
        return "-"
    calls = sum(bool(parse_tool_output(q["text"], "<tool_call>", TOOL_NAMES)[1] or parse_tool_calls(q["text"]))
                for q in log)
    return (f"{len(log)} req, {sum(q['seconds'] for q in log) / len(log):.0f} s each "
            f"({sum(q['prompt_tokens'] for q in log) / len(log):.0f} prompt tok), {calls} with a tool call")


def table(figs, stats):
    """The markdown table: one row per arm and seed, then each arm's mean over seeds."""
    head = ("| arm | seed | baseline | final best (honest) | gain | test: baseline → best | trials llm/tuner | "
            "keeps llm/tuner | llm invalid (no tool call) / crash | model | wall |\n" + "|---" * 11 + "|")
    lines, means = [head], {}
    for tag, f in figs.items():
        arm, seed = tag.rsplit("-s", 1)
        side = lambda k: "/".join(str(f["sides"].get(s, {}).get(k, 0)) for s in ("llm", "tuner"))
        wall = stats[tag]["wall"]
        model = requests_text(stats[tag]["requests"]) if stats[tag]["requests"] else (
            f"{f['model_s']:.0f} s in its trials" if f["model_s"] else "-")
        lines.append(f"| {arm} | {seed} | {f['baseline']:.4g} | {f['best']:.4g} ({fmt(f['honest'])}) | "
                     f"{f['gain']:.1f}% | {fmt(f['test_base'])} → {fmt(f['test_best'])} | {side('trials')} | "
                     f"{side('keeps')} | {f['invalid']} ({f['no_call']}) / {f['crash']} | {model} | "
                     f"{wall / 60:.1f} min |")
        means.setdefault(arm, []).append(f["gain"])
    lines += ["", "| arm | mean gain over seeds | sd over seeds | seeds |", "|---|---|---|---|"]
    lines += [f"| {arm} | {sum(g) / len(g):.1f}% | {f'{statistics.stdev(g):.1f}' if len(g) > 1 else '-'} | "
              f"{' '.join(f'{x:.1f}%' for x in g)} |" for arm, g in means.items()]
    return "\n".join(lines)


def fmt(v):
    return "-" if v is None else f"{v:.4g}"


def plot(figs, path, metric):
    """Best so far relative to each run's own baseline, against trials: a colour per arm, a line style per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    arms = list(dict.fromkeys(tag.rsplit("-s", 1)[0] for tag in figs))
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=90)
    for tag, f in figs.items():
        arm, seed = tag.rsplit("-s", 1)
        x, y = zip(*f["curve"])
        ax.step(x, y, where="post", color=f"C{arms.index(arm)}", ls=["-", "--", ":", "-."][int(seed) % 4], lw=1.8,
                label=f"{arm} s{seed}: {f['gain']:+.1f}%")
    ax.axhline(1, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial (experiment after the baseline)")
    ax.set_ylabel(f"best {metric.column} so far / baseline ({metric.better} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best", framealpha=0.8)
    ax.set_title("proposers at equal compute (gain: final best against the run's own baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a folder: the arms' repositories, logs and results, the report")
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=list(AGENT))
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 of each arm (data, tuner)")
    ap.add_argument("--trials", type=int, default=8, help="--max-experiments of every arm")
    ap.add_argument("--budget", type=int, default=20, help="training seconds per run")
    ap.add_argument("--noise-runs", type=int, default=2)
    ap.add_argument("--allowance", type=int, default=60, help="--allowance (a busy CPU starts and exports slowly)")
    ap.add_argument("--model", default="gemma3:270m", help="the model of the llm and hybrid arms: served by "
                    "tests/llm_server.py (smollm2:135m, gemma3:270m), or --host's")
    ap.add_argument("--host", help="a real Ollama with --model pulled (then no llm_server)")
    ap.add_argument("--num-ctx", type=int, default=12288, help="--num-ctx of the model's arms (the template's "
                    "train.py needs about 10.5K)")
    ap.add_argument("--num-predict", type=int, default=512, help="llm_server: most tokens a reply may have")
    ap.add_argument("--parallel", type=int, default=1, help="arm-seeds at once, each on cores / N")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--report-only", action="store_true", help="no runs: the report over the arm-seeds of --arms and "
                    "--seeds whose results are in --out")
    a = ap.parse_args()
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    engine = None
    if not a.host and {"llm", "hybrid"} & set(a.arms) and not a.report_only:
        from llm_server import Engine
        engine = Engine(a.model, num_predict=a.num_predict)
    t0 = time.time()
    if not a.report_only:
        run_all(a, engine)
    shutil.copy(os.path.join(ROOT, "prepare_data.py"), a.out)   # report --compare reads the metric there
    tags = [f"{arm}-s{s}" for arm in a.arms for s in range(a.seeds)
            if os.path.exists(os.path.join(a.out, f"results-{arm}-s{s}.tsv"))]
    subprocess.run([sys.executable, os.path.join(ROOT, "autoresearch.py"), "report", "--compare", *tags], cwd=a.out,
                   check=True)
    metric = project_metric(a.out)
    test = load_test_scores(metric, os.path.join(a.out, "test_scores.tsv"))
    figs = {tag: figures(load_results(os.path.join(a.out, f"results-{tag}.tsv"), metric=metric), test, metric)
            for tag in tags}
    stats = {tag: json.load(open(os.path.join(a.out, f"stats-{tag}.json"))) for tag in tags}
    text = table(figs, stats)
    settings = (f"{a.trials} trials per arm, budget {a.budget} s, {a.noise_runs} noise runs, data {a.n_train}/"
                f"{a.n_val}/{a.n_test}, model {a.host or 'llm_server'} {a.model}, parallel {a.parallel}; "
                f"{(time.time() - t0) / 60:.0f} min")
    print(f"\n{settings}\n\n{text}")
    with open(os.path.join(a.out, "agents.md"), "w") as f:
        f.write(settings + "\n\n" + text + "\n")
    plot(figs, os.path.join(a.out, "agents.png"), metric)
    print(f"wrote {a.out}/agents.md, {a.out}/agents.png")


if __name__ == "__main__":
    main()
