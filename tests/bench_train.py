"""Benchmark: train.py for a budget, then the trusted evaluator; prints the figures (not collected by pytest).

    python tests/bench_train.py                                  # one 120 s run, seed 0
    python tests/bench_train.py --budget 120 300                 # budget comparison
    python tests/bench_train.py --expert on off --seeds 0 1 2    # expert path on vs off, 3 seeds each

train.py's constants stay the source of truth: "--expert off" runs a copy of train.py with EXPERT_LOSS_WEIGHT = 0.0
from a temp dir; the seed goes through AUTORESEARCH_SEED, like the harness's noise runs.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_script(tmp, expert):
    src = (ROOT / "train.py").read_text()
    if expert == "off":
        src, n = re.subn(r"^EXPERT_LOSS_WEIGHT = .*$", "EXPERT_LOSS_WEIGHT = 0.0", src, flags=re.M)
        assert n == 1, "EXPERT_LOSS_WEIGHT constant not found in train.py"
    path = Path(tmp) / f"train_expert_{expert}.py"
    path.write_text(src)
    return path


def run_one(script, data, budget, seed, out):
    env = {**os.environ, "AUTORESEARCH_DATA": str(data), "AUTORESEARCH_OUT": str(out),
           "AUTORESEARCH_TIME_BUDGET": str(budget), "AUTORESEARCH_SEED": str(seed),
           "AUTORESEARCH_WEIGHTS": os.environ.get("AUTORESEARCH_WEIGHTS", str(ROOT / "weights"))}
    t0 = time.time()
    tr = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    t_train = time.time() - t0
    if tr.returncode != 0:
        return {"error": (tr.stdout + tr.stderr)[-1500:]}
    ev = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--evaluate", str(out), "--data", str(data)],
                        capture_output=True, text=True)
    total = time.time() - t0
    if ev.returncode != 0:
        return {"error": ev.stderr[-1500:]}
    vals = dict(line.split(": ", 1) for line in ev.stdout.splitlines() if ": " in line)
    stats = json.loads((Path(out) / "train_stats.json").read_text())
    return {"val_mean_rank": float(vals["val_mean_rank"]), "val_median_rank": float(vals["val_median_rank"]),
            "val_r1": float(vals["val_r1"]), "val_r10": float(vals["val_r10"]), "val_n": int(vals["val_n"]),
            "steps": stats["num_steps"], "train_s": stats["training_seconds"], "train_proc_s": round(t_train, 1),
            "total_s": round(total, 1), "final_loss": stats["final_loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, nargs="+", default=[120])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--expert", choices=["on", "off"], nargs="+", default=["on"])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("AUTORESEARCH_DATA") or ROOT / "data"))
    args = p.parse_args()
    if not (args.data / "meta.json").exists():
        sys.exit(f"no data in {args.data}: run python prepare_data.py first")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} | data {args.data} | load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for expert in args.expert:
            script = train_script(tmp, expert)
            for budget in args.budget:
                for seed in args.seeds:
                    res = run_one(script, args.data, budget, seed, Path(tmp) / f"run-{expert}-{budget}-{seed}")
                    results.setdefault((expert, budget), []).append(res)
                    if "error" in res:
                        print(f"expert={expert} budget={budget:g} seed={seed} FAILED:\n{res['error']}", flush=True)
                        continue
                    random = (res["val_n"] + 1) / 2
                    print(f"expert={expert} budget={budget:g} seed={seed} | val_mean_rank {res['val_mean_rank']:.2f}"
                          f" ({100 * res['val_mean_rank'] / random:.1f}% of random) | median {res['val_median_rank']:.1f}"
                          f" | r1 {res['val_r1']:.3f} | r10 {res['val_r10']:.3f} | steps {res['steps']}"
                          f" | train {res['train_s']:.1f}s | total {res['total_s']:.1f}s"
                          f" (budget+{res['total_s'] - budget:.1f}s) | load {os.getloadavg()[0]:.2f}", flush=True)
    print("# summary: mean +- std of val_mean_rank")
    for (expert, budget), rs in results.items():
        ranks = [r["val_mean_rank"] for r in rs if "error" not in r]
        if ranks:
            sd = statistics.stdev(ranks) if len(ranks) > 1 else 0.0
            print(f"expert={expert} budget={budget:g}: {statistics.mean(ranks):.2f} +- {sd:.2f} (n={len(ranks)})")
    return 0 if all("error" not in r for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
