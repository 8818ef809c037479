"""Per-run fixed cost of ./run.sh on the real template: everything a run costs beyond its training seconds
(two containers, imports, model build, export, interpreter exit, copy-out, evaluation), in host mode on the default
synthetic data, and where it goes. Prints the medians of N runs of each kind:

  cold   ./run.sh, as a baseline or a seed rerun runs
  warm   ./run.sh --wait, told go once its containers have loaded torch, as the loop runs a candidate while the model
         writes it (the wait is not counted: the figures start at go)

    python tests/bench_fixed_cost.py [--runs 5] [--budget 10] [--repo DIR]

--repo takes run.sh, engine/, prepare_data.py and train.py from another checkout (e.g. a git worktree of an
older commit, for a before/after); warm runs are skipped where its run.sh has no --wait.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARM_UP_S = 15   # the model's turn: long enough for both containers to load torch and train.py's imports


def one_run(repo, env, warm):
    """(fixed cost, its parts) of one run, in seconds."""
    argv = ["./run.sh", "--wait"] if warm else ["./run.sh"]
    p = subprocess.Popen(argv, cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if warm:
        assert p.stdout.readline().strip() == "run.sh: ready"
        time.sleep(WARM_UP_S)
        p.stdin.write("go\n")
        p.stdin.flush()
    t0 = time.perf_counter()
    out = p.communicate()[0]
    wall = time.perf_counter() - t0
    assert p.returncode == 0, out[-3000:]
    block = out.split("--- trusted evaluation ---")[1]
    m = {k: float(v) for k, v in re.findall(r"^(\w+): ([\d.]+)$", block, re.M)}
    export = float(re.search(r"exported to \S+ in ([\d.]+)s", out).group(1))
    train_rest = m["train_wall_seconds"] - m["training_seconds"] - export
    return wall - m["training_seconds"], {
        "training container: start, imports, data, model, exit": train_rest, "export": export,
        "evaluation": m["eval_seconds"],
        "between: copy-out, evaluator's wait for its go, output": wall - m["train_wall_seconds"] - m["eval_seconds"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget", type=int, default=10)
    ap.add_argument("--repo", type=Path, default=ROOT)
    a = ap.parse_args()
    repo = a.repo.resolve()
    data = ROOT / "data"
    if not (data / "meta.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "prepare_data.py")], check=True, capture_output=True)
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data),
               AUTORESEARCH_TIME_BUDGET=str(a.budget), AUTORESEARCH_RUN_DIR=str(repo / "runs" / "bench"))
    kinds = ["cold"] + (["warm"] if "--wait" in (repo / "run.sh").read_text() else [])
    results = {k: [] for k in kinds}
    for _ in range(a.runs):
        for k in kinds:   # interleaved, so background load hits both alike
            results[k].append(one_run(repo, env, k == "warm"))
    print(f"{repo} at a {a.budget} s budget, {a.runs} runs each, medians:")
    for k, runs in results.items():
        total = [r[0] for r in runs]
        print(f"  {k}: fixed cost {statistics.median(total):.2f} s  (runs: {' '.join(f'{x:.2f}' for x in total)})")
        for part in runs[0][1]:
            print(f"      {part}: {statistics.median(r[1][part] for r in runs):.2f} s")


if __name__ == "__main__":
    main()
