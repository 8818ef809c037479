"""Benchmark: --agent optuna against --agent random (or llm with a scripted model elsewhere) in the real loop, side
by side, then `report --compare`. Prints the table and writes compare.png (not collected by pytest).

    python tests/bench_tuners.py --out /tmp/tuners --budget 60 --experiments 12      # issue 10's comparison
    python tests/bench_tuners.py --out /tmp/smoke --budget 3 --experiments 1 --n-train 300   # a smoke run (minutes)

Each agent runs in its own copy of the repository (the committed tree) with its own branch, from the same data and
the same baseline train.py, at the same time: both see the same machine load. The tuners vary program.md's own
`## Search space`.
"""
import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IDENTITY = dict(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench",
                GIT_COMMITTER_EMAIL="bench@localhost")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a new folder: one repository per agent, the data, compare.png")
    ap.add_argument("--agents", nargs="+", default=["optuna", "random"])
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--experiments", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="--tuner-seed of every agent")
    ap.add_argument("--n-train", type=int, default=8000, help="synthetic training examples (val and test: 1000)")
    a = ap.parse_args()
    os.makedirs(a.out)
    data = os.path.join(a.out, "data")
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", data, "--n-train", str(a.n_train)],
                   check=True, capture_output=True)
    env = dict(os.environ, AUTORESEARCH_DATA=data, **IDENTITY)
    procs = {}
    for agent in a.agents:
        repo = os.path.join(a.out, agent)
        subprocess.run(["git", "clone", "-q", ROOT, repo], check=True)
        log = open(os.path.join(a.out, f"{agent}.log"), "w")
        procs[agent] = subprocess.Popen(
            [sys.executable, "autoresearch.py", "--agent", agent, "--tag", agent, "--tuner-seed", str(a.seed),
             "--max-experiments", str(a.experiments), "--time-budget", str(a.budget)],
            cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    failed = [agent for agent, p in procs.items() if p.wait() != 0]
    if failed:
        sys.exit(f"these runs failed: {failed}; see {a.out}/AGENT.log")
    for agent in a.agents:   # gather the runs and their test scores where `report --compare` looks for them
        shutil.copy(os.path.join(a.out, agent, "results.tsv"), os.path.join(a.out, f"results-{agent}.tsv"))
        scores = os.path.join(a.out, agent, "test_scores.tsv")
        if os.path.exists(scores):
            with open(scores) as f, open(os.path.join(a.out, "test_scores.tsv"), "a") as out:
                out.write(f.read())
    shutil.copy(os.path.join(ROOT, "prepare_data.py"), a.out)   # the report reads the metric's declaration there
    subprocess.run([sys.executable, os.path.join(ROOT, "autoresearch.py"), "report", "--compare", *a.agents],
                   cwd=a.out, check=True)


if __name__ == "__main__":
    main()
