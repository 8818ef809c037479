"""Benchmarks of --workers N (prints figures; not collected by pytest).

1. Slot utilization at N = 1, 2, 4: the real harness, run.sh (podman, host mode) and the loopback fake Ollama, which
   answers every request after --delay seconds. train.py is the template with a `time.sleep(--sleep)` at its start:
   it mostly sleeps, so this measures the harness (how well model time overlaps training), not the CPU. A worker's
   slot is busy while its run is in flight; utilization = training seconds / wall seconds (`report`'s figure), and
   the model's share of a round bounds it: a round of N waits N x delay for the model before its last run starts,
   so utilization <= T / (T + N x delay) for a run of T seconds.

       python tests/bench_workers.py utilization [--delay 10] [--sleep 60] [--rounds 2] [--workers 1 2 4]

The keep rule with workers (false keeps, power, the gain per run) is in the Monte Carlo of whole searches:
python tests/bench_research.py --mc-searches 4000.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from engine.project import Metric
from engine.report import summarize
from engine.results import append_row, load_results
from fake_ollama import FakeOllama, delay, tool_calls  # noqa: E402
from test_loop import BOOM, TXT_BAD, git, make_repo  # noqa: E402


def utilization(args):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        subprocess.run([sys.executable, str(HERE.parent / "prepare_data.py"), "--out", str(data), "--n-train", "128",
                        "--n-val", "48", "--n-test", "40"], check=True, capture_output=True)
        print(f"fake model: {args.delay:g} s per answer; train.py sleeps {args.sleep:g} s, then trains 2 s; "
              f"{os.cpu_count()} cores; {args.rounds} round(s) per N")
        print(f"{'N':>3} {'experiments':>12} {'wall s':>8} {'exp/hour':>9} {'run s (mean)':>13}  utilization per worker"
              f"  (bound T/(T+N*delay))")
        for n in args.workers:
            repo = make_repo(tmp / f"repo{n}")
            src = (repo / "train.py").read_text().replace(BOOM, f"    time.sleep({args.sleep})\n" + BOOM)
            (repo / "train.py").write_text(src)
            git(repo, "commit", "-qam", "sleep")
            git(repo, "checkout", "-q", "-b", "autoresearch/bench")
            head = git(repo, "rev-parse", "HEAD")
            append_row({"experiment": 0, "commit": head, "val_mean_rank": 48.0, "delta": 0.0, "status": "baseline",
                           "description": "baseline", "runs": (48.0, 48.0), "best": 48.0, "sigma": 0.0,
                           "best_commit": head, "train_wall_seconds": args.sleep + 120.0, "round": 0, "worker": 0},
                          Metric("mean_rank", "minimize"), str(repo / "results.tsv"))
            # every experiment: one answer that edits train.py (a different comment each time) and runs it
            script = [delay(args.delay, tool_calls(
                ("edit_file", {"path": "train.py", "old_text": TXT_BAD,
                               "new_text": TXT_BAD.rstrip("\n") + f"  # {i}\n"}),
                ("run_experiment", {"description": f"variant {i}"}))) for i in range(n * args.rounds)]
            # each edit replaces the sabotaged line of the round's base; a keep would change it: none can pass here
            with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
                env = dict(os.environ, OLLAMA_HOST=fake.url, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data),
                           AUTORESEARCH_TIME_BUDGET="2", PYTHONUNBUFFERED="1", GIT_AUTHOR_NAME="b",
                           GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
                env.pop("AUTORESEARCH_SANDBOX", None)
                t0 = time.time()
                p = subprocess.run([sys.executable, "autoresearch.py", "--resume", "--workers", str(n),
                                    "--max-experiments", str(n * args.rounds), "--noise-runs", "2"],
                                   cwd=repo, env=env, capture_output=True, text=True)
                wall = time.time() - t0
            if p.returncode != 0:
                sys.exit(f"N={n}: the harness failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            rows = [r for r in load_results(str(repo / "results.tsv")) if r["status"] != "baseline"]
            s = summarize(load_results(str(repo / "results.tsv")))
            runs = [float(r["run_seconds"]) for r in rows]
            t = sum(runs) / len(runs)
            # utilization over the rounds only (the seeded baseline took no time here)
            util = ", ".join(f"{k}: {v:.0%}" for k, v in sorted(s["slots"].items()))
            print(f"{n:>3} {len(rows):>12} {wall:>8.0f} {len(rows) / wall * 3600:>9.1f} {t:>13.1f}  {util}  "
                  f"({t / (t + n * args.delay):.0%}); statuses {sorted({r['status'] for r in rows})}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    u = sub.add_parser("utilization")
    u.add_argument("--delay", type=float, default=10.0)
    u.add_argument("--sleep", type=float, default=60.0)
    u.add_argument("--rounds", type=int, default=2)
    u.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    utilization(p.parse_args())
