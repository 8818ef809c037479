"""Benchmark (issue 5): how often would pure seed changes be "kept" under the naive rule vs the noise-aware rule?

    python tests/bench_noise.py [--runs 6] [--budget 5] [--n-val 200] [--baseline-runs 3]
    python tests/bench_noise.py --values V1 V2 ...     # analyse val_mean_rank values measured elsewhere

Runs the unmodified template train.py through the real run.sh (AUTORESEARCH_IMAGE=host) with seeds 1..R on tiny
synthetic data. Nothing but the seed changes, so every "keep" is a false discovery. For every choice of
--baseline-runs runs as the baseline (best = their mean, sigma = their standard deviation) and every other run as
a candidate:
  naive rule:       keep if candidate < best
  noise-aware rule: autoresearch.decide (keep if best - candidate > max(z*sigma, floor*best)); also with the
                    pooled sigma of all runs, which the loop approaches as kept experiments accumulate.
"""
import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from engine.judge import decide, parse_metrics, pooled_sigma  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--budget", type=int, default=5)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--z", type=float, default=2.0)
    ap.add_argument("--floor", type=float, default=0.01)
    ap.add_argument("--baseline-runs", type=int, default=3, help="seeded baseline runs, like --noise-runs")
    ap.add_argument("--values", type=float, nargs="*", help="analyse these val_mean_rank values (e.g. from "
                    "tests/bench_train.py --seeds ...) instead of running")
    a = ap.parse_args()
    if a.values:
        return report(a.values, a, "given values")
    tmp = tempfile.mkdtemp(prefix="bench-noise-")
    try:
        data = os.path.join(tmp, "data")
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", data, "--n-train", "1000",
                        "--n-val", str(a.n_val), "--n-test", "40"], check=True, capture_output=True)
        values = []
        for seed in range(1, a.runs + 1):
            env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=data, AUTORESEARCH_SEED=str(seed),
                       AUTORESEARCH_TIME_BUDGET=str(a.budget), AUTORESEARCH_RUN_DIR=os.path.join(tmp, f"run{seed}"))
            p = subprocess.run(["./run.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
            m = parse_metrics(p.stdout)
            if p.returncode != 0 or "val_mean_rank" not in m:
                sys.exit(f"run.sh failed for seed {seed}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            values.append(m["val_mean_rank"])
            print(f"seed {seed}: val_mean_rank {m['val_mean_rank']:.2f} ({m.get('num_steps', 0):.0f} steps)",
                  flush=True)
        report(values, a, f"budget {a.budget}s, n_val {a.n_val}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(values, a, what):
    """Every choice of `baseline_runs` runs as the baseline, every other run as a seed-only 'candidate'."""
    pooled = statistics.stdev(values)
    trials = naive = rule = rule_pooled = 0
    for base in itertools.combinations(range(len(values)), a.baseline_runs):
        runs = [values[i] for i in base]
        best, sigma = statistics.mean(runs), pooled_sigma([runs])
        for k in set(range(len(values))) - set(base):
            trials += 1
            naive += values[k] < best
            rule += decide([values[k]], best, sigma, a.z, a.floor)[0] == "keep"
            rule_pooled += decide([values[k]], best, pooled, a.z, a.floor)[0] == "keep"
    print(f"{len(values)} seeds ({what}): mean {statistics.mean(values):.2f}, sigma {pooled:.2f} "
          f"({pooled / statistics.mean(values):.1%})")
    print(f"seed-only changes kept: naive {naive}/{trials} ({naive / trials:.0%}), noise-aware with the "
          f"{a.baseline_runs}-run sigma {rule}/{trials} ({rule / trials:.0%}), with the pooled sigma "
          f"{rule_pooled}/{trials} ({rule_pooled / trials:.0%})  [z={a.z}, floor={a.floor:.0%}]")


if __name__ == "__main__":
    main()
