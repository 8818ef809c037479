"""Benchmark: harness overhead per experiment and prompt tokens per experiment, on the real template.

    python tests/bench_harness.py [--experiments 5] [--budget 2]

Runs autoresearch.py for N experiments against the scripted Ollama server (tests/fake_ollama.py; model time ~0),
the real run.sh (AUTORESEARCH_IMAGE=host) and real training on tiny data in a temp git repo, then prints medians:
  harness overhead = the time from one experiment's first model request to the next one's, minus model wait and
                     run.sh time (git, prompt building, parsing, tools, results.tsv, refreshing progress.png)
  run.sh fixed cost = run.sh time - training_seconds - eval_seconds  (container starts, imports, export)
  prompt tokens     = the first request of each experiment (system + user message + tool schemas),
                      counted as the fake server does (chars/4) and, conservatively for code, chars/3.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from conftest import copy_into  # noqa: E402
from engine.agent import build_user_message  # noqa: E402
from engine.project import project_metric  # noqa: E402
from engine.judge import parse_metrics
from engine.results import load_results
from fake_ollama import FakeOllama, estimate_tokens, tool_call  # noqa: E402

FILES = ["autoresearch.py", "engine", "train.py", "run.sh", "prepare_data.py", "program.md",
         "scratchpad.md", ".gitignore"]


def edit_weight_decay(i):
    def reply(req):
        cur = re.search(r"^WEIGHT_DECAY = (.+)$", req["messages"][1]["content"], re.M).group(1)
        return tool_call("edit_file", path="train.py", old_text=f"WEIGHT_DECAY = {cur}",
                         new_text=f"WEIGHT_DECAY = {1e-4 * (i + 2):.1e}")
    return reply


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiments", type=int, default=5)
    ap.add_argument("--budget", type=int, default=2)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-harness-")
    try:
        data, repo = os.path.join(tmp, "data"), os.path.join(tmp, "repo")
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", data, "--n-train", "256",
                        "--n-val", "64", "--n-test", "32"], check=True, capture_output=True)
        os.mkdir(repo)
        copy_into(repo, FILES)
        env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=data, GIT_AUTHOR_NAME="b",
                   GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "template"]):
            subprocess.run(["git", *args], cwd=repo, check=True, env=env)
        script = []
        for i in range(a.experiments):
            script += [edit_weight_decay(i), tool_call("run_experiment", description=f"weight decay variant {i}")]
        with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
            env["OLLAMA_HOST"] = fake.url
            t0 = time.time()
            p = subprocess.run([sys.executable, "autoresearch.py", "--tag", "bench", "--noise-runs", "2",
                                "--time-budget", str(a.budget), "--max-experiments", str(a.experiments)],
                               cwd=repo, env=env, capture_output=True, text=True)
            total = time.time() - t0
            if p.returncode != 0:
                sys.exit(f"harness failed:\n{p.stdout}\n{p.stderr}")
            chats = [r for r in fake.requests if r["path"] == "/api/chat"]
            starts = [r["time"] for r in chats if len(r["json"]["messages"]) == 2]
            firsts = [r["json"] for r in chats if len(r["json"]["messages"]) == 2]
        rows = load_results(os.path.join(repo, "results.tsv"))
        overhead, fixed, runs = [], [], []
        exps = [r for r in rows if r["status"] != "baseline"]
        for i, r in enumerate(exps):
            model, run = (float(r[k]) for k in ("model_seconds", "run_seconds"))
            if i + 1 < len(starts):   # cycle = this experiment's first request .. the next one's
                overhead.append(starts[i + 1] - starts[i] - model - run)
            with open(os.path.join(repo, "logs", f"{r['experiment']}.log")) as f:
                m = parse_metrics(f.read())
            fixed.append(run - m.get("training_seconds", 0) - m.get("eval_seconds", 0))
            runs.append(run)
        # in-process pieces, for scale
        with open(os.path.join(repo, "logs", "1.log")) as f:
            log = f.read()
        t = time.perf_counter()
        for _ in range(1000):
            parse_metrics(log)
        parse_us = (time.perf_counter() - t) * 1000
        loop_rows = rows * 5
        with open(os.path.join(ROOT, "train.py")) as f:
            src = f.read()
        t = time.perf_counter()
        for _ in range(1000):
            build_user_message(project_metric(), src, "notes\n" * 100, loop_rows, "best", "Phase 1: x", "logs/1.log")
        build_us = (time.perf_counter() - t) * 1000
        chars = [sum(len(m["content"]) for m in r["messages"]) + len(json.dumps(r["tools"])) for r in firsts]
        toks = [estimate_tokens(r) for r in firsts]
        print(f"experiments: {len(exps)} (budget {a.budget}s, tiny data, AUTORESEARCH_IMAGE=host), "
              f"total {total:.0f}s")
        print(f"harness overhead per experiment (cycle - model - run.sh): median {statistics.median(overhead):.2f}s "
              f"(min {min(overhead):.2f}, max {max(overhead):.2f})  [target <= 3s]")
        print(f"run.sh fixed cost per run (run.sh - training - evaluation): median {statistics.median(fixed):.1f}s "
              f"of run.sh median {statistics.median(runs):.1f}s")
        print(f"in-process: parse_metrics {parse_us:.0f}us, build_user_message {build_us:.0f}us")
        print(f"prompt per experiment (first request): median {statistics.median(chars):.0f} chars, "
              f"~{statistics.median(toks):.0f} tokens at chars/4, ~{statistics.median(chars) / 3:.0f} at chars/3 "
              f"[target <= 8K]")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
