"""Container start-up overhead of ./run.sh: a train.py that only hands off a tiny exported model, run in host
mode (two containers: training and evaluation) versus AUTORESEARCH_SANDBOX=none. Prints the medians of 5.

    python tests/bench_sandbox.py [N]
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import copy_into  # noqa: E402
from test_sandbox import EXPORT_MODEL  # noqa: E402  (the same do-nothing train.py the tests use)


def main(n=5):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--out", str(tmp / "data"), "--n-train", "16",
                        "--n-val", "16", "--n-test", "16"], check=True, capture_output=True)
        repo = tmp / "repo"
        repo.mkdir()
        copy_into(repo, ("run.sh", "engine", "prepare_data.py"))
        (repo / "train.py").write_text(EXPORT_MODEL)
        times = {"host": [], "none": []}
        for i in range(n):
            for mode in times:   # interleaved, so background load hits both alike
                env = dict(os.environ, AUTORESEARCH_DATA=str(tmp / "data"), AUTORESEARCH_IMAGE="host")
                if mode == "none":
                    env["AUTORESEARCH_SANDBOX"] = "none"
                t = time.perf_counter()
                p = subprocess.run(["./run.sh"], cwd=repo, env=env, capture_output=True, text=True)
                times[mode].append(time.perf_counter() - t)
                assert p.returncode == 0, p.stdout + p.stderr
        med = {m: statistics.median(v) for m, v in times.items()}
        for m, v in times.items():
            print(f"{m:5s} runs: " + " ".join(f"{x:.2f}" for x in v) + f"  median {med[m]:.2f} s")
        print(f"sandbox overhead (host mode, 2 containers): {med['host'] - med['none']:.2f} s  (target <= 2 s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
