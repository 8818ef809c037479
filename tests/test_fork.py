"""A fork: the engine kept as it is, a different project in its place (tests/fork/: a blob classifier scored by
accuracy, higher is better), run through the real ./run.sh in the sandbox (podman, host mode). The constants the
project declares reach the trusted block, its train.py's changes move the metric both ways, and the engine's checks
still guard its hand-off. The README's "Fork it" section describes exactly these steps."""
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import copy_into

ROOT = Path(__file__).resolve().parents[1]
FORK = ROOT / "tests" / "fork"
ENGINE = ["autoresearch.py", "engine", "run.sh", "Containerfile", "requirements.txt", ".gitignore"]
PROJECT = ["prepare_data.py", "train.py", "program.md"]
N_VAL = 400
pytestmark = pytest.mark.sandbox

BASELINE = "LEARNING_RATE = 0.003\n"
# A hostile train.py, spliced in before the export: it looks at the data it was given, and exports each image's logits
# minus its batch's mean (which uses the rest of the batch).
HOSTILE = '''
    print("PROBE data:", sorted(os.listdir(DATA)), flush=True)
    class Centred(nn.Module):
        def __init__(s, m):
            super().__init__()
            s.m = m
        def forward(s, x):
            y = s.m(x)
            return y - y.mean(0, keepdim=True)
    ep = torch.export.export(Centred(model), (torch.rand(2, 1, s, s),), dynamic_shapes=({0: batch},))
'''


def make_fork(path, train_src=None):
    """A git repository as a fork starts it: the engine's files copied as they are, the project's from tests/fork/
    (train.py replaced by train_src if given), an empty scratchpad."""
    path.mkdir(parents=True)
    copy_into(path, ENGINE)
    for f in PROJECT:
        shutil.copy2(FORK / f, path / f)
    if train_src is not None:
        (path / "train.py").write_text(train_src)
    (path / "scratchpad.md").write_text("# Scratchpad\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "fork: a blob classifier"]):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return path


def train_with(old, new):
    src = (FORK / "train.py").read_text()
    assert src.count(old) == 1, old
    return src.replace(old, new)


def run_sh(repo, data, *args):
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="20",
               AUTORESEARCH_GRACE="60", AUTORESEARCH_EVAL_TIMEOUT="120", AUTORESEARCH_MEMORY="2g")
    for k in ("AUTORESEARCH_SANDBOX", "AUTORESEARCH_RUN_DIR", "AUTORESEARCH_SEED"):
        env.pop(k, None)
    p = subprocess.run(["./run.sh", *args], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, text=True, timeout=400, start_new_session=True)
    p.lines = p.stdout.rstrip("\n").split("\n")
    marks = [i for i, line in enumerate(p.lines) if line == "--- trusted evaluation ---"]
    p.block = [line for line in p.lines[marks[0] + 1:] if not line.startswith("run.sh: ")] if marks else []
    p.metrics = dict(line.split(": ", 1) for line in p.block)
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The fork's data, built by its own prepare_data.py, and every run of this module, side by side."""
    base = tmp_path_factory.mktemp("fork")
    data = base / "data"
    subprocess.run([sys.executable, str(FORK / "prepare_data.py"), "--out", str(data), "--n-train", "2000",
                    "--n-val", str(N_VAL), "--n-test", str(N_VAL)], check=True, capture_output=True)
    train = {
        "baseline": None,
        "higher_lr": train_with(BASELINE, "LEARNING_RATE = 0.03\n"),
        "lower_lr": train_with(BASELINE, "LEARNING_RATE = 0.0003\n"),
        "hostile": train_with("    torch.export.save(", HOSTILE.lstrip("\n") + "    torch.export.save("),
    }
    repos = {name: make_fork(base / name, src) for name, src in train.items()}
    t = time.time()
    with ThreadPoolExecutor(len(repos)) as pool:
        out = dict(zip(repos, pool.map(lambda repo: run_sh(repo, data), repos.values())))
    out["test"] = run_sh(repos["baseline"], data, "--test", "runs/last")
    print(f"fork runs: {time.time() - t:.0f}s; " + ", ".join(f"{k} {v.block[:1]}" for k, v in out.items()))
    out["data"] = data
    return out


def accuracy(p):
    assert p.returncode == 0, p.stdout[-3000:]
    assert p.block[0].startswith("val_accuracy: "), p.block   # the project's METRIC, first
    return float(p.metrics["val_accuracy"])


def test_the_trusted_block_carries_the_projects_metric(runs):
    p = runs["baseline"]
    value = accuracy(p)
    assert 0.5 < value < 0.9, value                           # trained (chance: 0.25), with room to improve
    assert p.block[1] == f"val_n: {N_VAL}" and p.metrics["num_steps"] == "150"
    assert "val_mean_rank" not in p.stdout and p.lines[-1].startswith("total_seconds: ")


def test_a_better_constant_raises_the_accuracy_and_a_worse_one_lowers_it(runs):
    base, higher, lower = (accuracy(runs[name]) for name in ("baseline", "higher_lr", "lower_lr"))
    assert higher > base + 0.05 and lower < base - 0.2, (base, higher, lower)


def test_the_test_split_is_scored_only_on_request(runs):
    p = runs["test"]
    assert p.returncode == 0, p.stdout[-3000:]
    assert p.lines[0] == "--- trusted evaluation ---" and p.block[0].startswith("test_accuracy: ")
    assert p.metrics["test_n"] == str(N_VAL) and "val_accuracy" not in p.stdout


def test_the_sandbox_and_the_engines_checks_guard_the_fork(runs):
    p = runs["hostile"]
    probe = re.search(r"^train\| PROBE data: (.*)$", p.stdout, re.M)
    assert probe and probe.group(1) == "['meta.json', 'train']", p.stdout[-3000:]   # no val/ or test/ in training
    assert p.returncode == 3 and "val_accuracy" not in p.metrics, p.stdout[-3000:]
    assert p.lines[-1].startswith("run.sh: REFUSED by the evaluator: classifier.pt2 gives a different output for "
                                  "the same input in another batch"), p.lines[-1]


def test_the_loop_keeps_and_reverts_in_the_forks_direction(tmp_path, runs):
    """The README's last step: python autoresearch.py in the fork, with the scripted model. The fork starts from a
    slow learning rate; raising it is kept (accuracy goes up: higher is better), lowering it again is reverted, and
    a hand-off the engine refuses is a crash with the engine's reason."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_ollama import FakeOllama, tool_call
    slow, fast = "LEARNING_RATE = 0.0003\n", "LEARNING_RATE = 0.03\n"
    repo = make_fork(tmp_path / "fork", train_with(BASELINE, slow))
    hostile = HOSTILE.lstrip("\n") + "    torch.export.save("
    script = [tool_call("edit_file", path="train.py", old_text=slow, new_text=fast),
              tool_call("run_experiment", description="raise the learning rate"),
              tool_call("edit_file", path="train.py", old_text=fast, new_text=slow),
              tool_call("run_experiment", description="lower the learning rate"),
              tool_call("edit_file", path="train.py", old_text="    torch.export.save(", new_text=hostile),
              tool_call("run_experiment", description="centre the logits on the batch")]
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(runs["data"]), PYTHONUNBUFFERED="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.pop("AUTORESEARCH_SANDBOX", None)
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        p = subprocess.run([sys.executable, "autoresearch.py", "--tag", "fork", "--max-experiments", "3",
                            "--noise-runs", "2", "--fix-attempts", "0", "--time-budget", "20"],
                           cwd=repo, env=dict(env, OLLAMA_HOST=fake.url), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and fake.remaining == 0, p.stdout[-3000:] + p.stderr[-3000:]
    header, *lines = (repo / "results.tsv").read_text().strip().split("\n")
    assert header.split("\t")[:6] == ["experiment", "commit", "val_accuracy", "delta", "status", "description"]
    rows = [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]
    assert [r["status"] for r in rows] == ["baseline", "keep", "discard", "crash"], rows
    base, keep, worse, refused = (float(r["val_accuracy"] or "nan") for r in rows)
    assert keep > base + 0.2 and float(rows[1]["delta"]) > 0, rows          # up is better: kept
    assert worse < keep - 0.2 and float(rows[2]["delta"]) < 0, rows         # down is worse: reverted
    assert "REFUSED by the evaluator" in rows[3]["reason"], rows[3]
    head = subprocess.run(["git", "show", "HEAD:train.py"], cwd=repo, capture_output=True, text=True).stdout
    assert fast in head and "Centred" not in head
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
    assert re.search(r"^best \(exp 1\) +[\d.]+ +[\d.]+$", p.stdout, re.M), p.stdout[-2000:]   # test_accuracy of best
    r = subprocess.run([sys.executable, "autoresearch.py", "report"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "val_accuracy (higher is better): baseline" in r.stdout, r.stdout + r.stderr
    assert (repo / "progress.png").stat().st_size > 10_000
