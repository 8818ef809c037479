"""A new user's first night: one loop per repository, nothing lost when the baseline fails, one clear line for every
mistake (exit 2, nothing changed), output that can be followed in a log file, and the tuner on the shipped template.
Real git, the real loop, run.sh in host mode (the tests marked `sandbox`) and the scripted Ollama server."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
from engine.project import Metric
from engine.report import load_test_scores, record_test_score
from engine.tuners import parse_params, random_params, search_space
from test_loop import (FILES, ROOT, alive, containers_of, data, env_for, git, harness,  # noqa: F401
                       make_repo, rows, seed_baseline, training_started, wait_for)
from fake_ollama import FakeOllama, delay, tool_call
from conftest import copy_into

UNCHANGED = tool_call("run_experiment", description="unchanged")


def loop(repo, env, *args):
    return subprocess.Popen([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def refused(repo, env, *args):
    """A second instance: exit 2 and one line naming the first one's pid."""
    p = harness(repo, env, *args, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    return p.stderr.strip()


@pytest.mark.sandbox
def test_one_loop_per_repository(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    with FakeOllama({"qwen2.5-coder:7b": 32768}, [UNCHANGED]) as fake:
        env = env_for(fake.url, data)
        first = loop(repo, env, "--tag", "lock", "--noise-runs", "2", "--max-experiments", "1", "--max-invalid", "0")
        wait_for(training_started(repo / "logs" / "0.log"), 300, "the baseline's first run to train")
        run_pid = int((repo / "runs" / ".running").read_text())
        # a second loop, a --resume, a report --test: each refused before it looks at anything, the first untouched
        for args in (["--tag", "other"], ["--resume"], ["report", "--test"]):
            assert refused(repo, env, *args) == (f"autoresearch: another autoresearch (pid {first.pid}) is running in "
                                                 f"this repository: wait for it to end, or stop it (kill {first.pid}; "
                                                 f"it cleans up), then start again"), args
            assert alive(run_pid) and containers_of(run_pid)
        assert harness(repo, env, "report").returncode in (0, 2)          # reading is allowed beside it
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, out + err
    assert [(r["experiment"], r["status"]) for r in rows(repo)] == [("0", "baseline"), ("1", "invalid")]
    assert git(repo, "branch", "--list", "autoresearch/other") == ""
    # report --test: each commit scored once (the loop's end scored the baseline: shown, not run again); where
    # run.sh fails, its own reason
    scored = (repo / "test_scores.tsv").read_text()
    p = harness(repo, env, "report", "--test")
    assert p.returncode == 0 and (repo / "test_scores.tsv").read_text() == scored, p.stdout + p.stderr
    (repo / "test_scores.tsv").unlink()
    p = harness(repo, dict(env, AUTORESEARCH_IMAGE="localhost/nosuch:1"), "report", "--test")
    assert p.returncode == 1 and "baseline: run.sh exit 2: podman could not start the container" in p.stdout, \
        p.stdout + p.stderr
    p = harness(repo, env, "report", "--test")
    assert p.returncode == 0 and not p.stderr, p.stdout + p.stderr
    scores = (repo / "test_scores.tsv").read_text()
    assert scores.count("\n") == 2                         # the header and the baseline (also the best)
    again = harness(repo, env, "report", "--test")
    assert again.returncode == 0 and (repo / "test_scores.tsv").read_text() == scores
    assert again.stdout.split("\n")[-3:] == p.stdout.split("\n")[-3:]
    # its output, redirected, has a plain line for each run's start and end, and one per decision
    for line in ("autoresearch: run 0 started (seed 1", "autoresearch: run 0 ended after", "autoresearch: run 0-s2 "
                 "started (seed 2", "experiment 0: baseline val_mean_rank 48 (the mean of 2 runs)",
                 "experiment 1: invalid: train.py is identical"):
        assert line in out, out

    # kill -9 releases the lock: the next --resume runs
    with FakeOllama({"qwen2.5-coder:7b": 32768}, [delay(60, UNCHANGED)]) as fake:
        env = env_for(fake.url, data)
        killed = loop(repo, env, "--resume", "--max-experiments", "2", "--max-invalid", "0")
        wait_for(lambda: fake.chat_requests, 60, "the model to be asked")
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
    with FakeOllama({"qwen2.5-coder:7b": 32768}, [UNCHANGED]) as fake:
        p = harness(repo, env_for(fake.url, data), "--resume", "--max-experiments", "2", "--max-invalid", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["status"] for r in rows(repo)] == ["baseline", "invalid", "invalid"]


SLOW_SEED_2 = '''    torch.manual_seed(SEED)
    if SEED == 2 and os.environ.get("OMP_NUM_THREADS") == "1":   # a busy machine, the first time round
        time.sleep(600)
'''


@pytest.mark.sandbox
def test_a_failed_baseline_keeps_its_finished_runs_and_resume_runs_the_rest(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    src = (repo / "train.py").read_text()
    (repo / "train.py").write_text(src.replace("    torch.manual_seed(SEED)\n", SLOW_SEED_2))
    git(repo, "commit", "-qam", "seed 2 is slow when the machine is busy")
    with FakeOllama({"qwen2.5-coder:7b": 32768}, [UNCHANGED]) as fake:
        env = env_for(fake.url, data)
        # seed 1 must end within its limit even on one core of a busy machine: 60 s (15 s ran out under load)
        p = harness(repo, dict(env, AUTORESEARCH_CPUS="1", AUTORESEARCH_GRACE="60"), "--tag", "base",
                    "--noise-runs", "3", "--max-experiments", "1", "--max-invalid", "0")
        assert p.returncode == 2, p.stdout + p.stderr
        err = p.stderr.strip().split("\n")[0]
        assert "baseline seed 2 ran out of time (its limit of budget 2s + grace 60s (AUTORESEARCH_GRACE))" in err
        assert "the machine was slower this time (busy?), not train.py over its budget" in err, err
        assert "The 1 finished seeds are recorded" in err and "--resume --tag base" in err, err
        (first,) = rows(repo)
        assert (first["status"], first["round"], first["description"]) == ("interrupted", "0", "baseline")
        assert len(first["runs"].split(",")) == 1 and (repo / "runs" / "0").is_dir()
        assert git(repo, "status", "--porcelain") == ""
        p = harness(repo, env, "--resume", "--noise-runs", "3", "--max-experiments", "1", "--max-invalid", "0")
        assert p.returncode == 0, p.stdout + p.stderr
    assert "3 runs to measure the noise; 1 recorded by experiment 0" in p.stdout
    rs = rows(repo)
    assert [(r["experiment"], r["status"]) for r in rs] == [("0", "interrupted"), ("1", "baseline"), ("2", "invalid")]
    assert rs[1]["runs"].split(",")[0] == first["runs"] and len(rs[1]["runs"].split(",")) == 3
    assert (repo / "runs" / "1").is_dir() and not (repo / "runs" / "0").exists()   # seed 1's hand-off, for --test
    assert (repo / "logs" / "1-s2.log").exists() and not (repo / "logs" / "1.log").exists()


def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    seed_baseline(repo, "bad")
    env = env_for("http://127.0.0.1:9", data)
    head, status = git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")

    def one_line(*args, **extra):
        p = harness(repo, dict(env, **extra), *args, timeout=60)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and not p.stdout.strip(), p.stdout + p.stderr
        assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == status
        return p.stderr.strip()

    for args, extra, message in (
            (["--resume"], {"AUTORESEARCH_TIME_BUDGET": "abc"},
             "AUTORESEARCH_TIME_BUDGET must be a whole number above 0, got 'abc'"),
            (["--resume"], {"AUTORESEARCH_MEMORY": "lots"}, "AUTORESEARCH_MEMORY must be a size like 16g or 500m"),
            (["--resume", "--time-budget", "7"], {}, "results.tsv was recorded with a 2s time budget, not the 7s")):
        assert message in one_line(*args, **extra)
    # --help and report need no budget: a bad one does not stop them
    for args in (["--help"], ["report"]):
        p = harness(repo, dict(env, AUTORESEARCH_TIME_BUDGET="abc"), *args)
        assert p.returncode == 0, p.stdout + p.stderr
    assert one_line("--workers", "0").startswith("autoresearch.py: error: --workers must be at least 1, got 0")
    text = (repo / "results.tsv").read_text()
    for damaged in (text + "garbage\n", text.replace("\tbaseline\t", "\tbaseline\n", 1)):
        (repo / "results.tsv").write_text(damaged)
        for args in (["--resume"], ["report"]):
            line = one_line(*args)
            assert "results.tsv line " in line and "delete or repair that line" in line, line
            assert (repo / "results.tsv").read_text() == damaged


def test_the_image_is_checked_before_the_branch_is_made(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    for f in ("Containerfile", "requirements.txt"):
        shutil.copy2(os.path.join(ROOT, f), repo / f)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the image's recipe")
    env = env_for("http://127.0.0.1:9", data)
    env.pop("AUTORESEARCH_IMAGE")
    p = harness(repo, env, "--tag", "img", "--agent", "random", timeout=60)
    assert p.returncode == 2 and "does not exist: build it once with ./run.sh --build" in p.stderr, p.stderr
    assert "AUTORESEARCH_IMAGE=host" in p.stderr
    assert git(repo, "branch", "--list", "autoresearch/img") == "" and not (repo / "results.tsv").exists()


@pytest.mark.sandbox
def test_the_random_tuner_runs_on_the_shipped_template(tmp_path, data):
    """program.md ships a ## Search space whose every draw builds: several random trials of the real template train
    nothing but complete runs (no crash from a configuration that cannot be built)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_into(repo, FILES)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "template")
    p = harness(repo, env_for("http://127.0.0.1:9", data), "--agent", "random", "--tag", "rnd", "--noise-runs", "2",
                "--max-experiments", "3", timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    space = search_space((repo / "train.py").read_text(), (repo / "program.md").read_text(), False)
    rs = rows(repo)
    assert [r["status"] for r in rs[1:]] and all(r["status"] in ("keep", "discard") for r in rs[1:]), rs
    assert [parse_params(r["description"], space) for r in rs[1:]] == [random_params(space, 0, k)
                                                                           for k in range(3)]


def test_prepare_data_says_what_it_is_doing(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", str(tmp_path / "d"),
                        "--n-train", "20", "--n-val", "5", "--n-test", "5"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    stages = ["drawing 20 synthetic train scenes", "drawing 5 synthetic val scenes", "drawing 5 synthetic test scenes",
              "caching the train split: 20 images", "caching the val split", "caching the test split",
              f"wrote {tmp_path / 'd'} (tokenizer"]
    found = [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in stages]
    assert found == sorted(found), p.stdout


def test_test_scores_start_anew_for_another_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mr, acc = Metric("mean_rank", "minimize"), Metric("accuracy", "maximize")
    record_test_score("c1", 12.5, mr)
    record_test_score("c2", 10.25, mr)
    assert load_test_scores(mr) == {"c1": 12.5, "c2": 10.25} and load_test_scores(acc) == {}
    record_test_score("c3", 0.75, acc)
    assert load_test_scores(acc) == {"c3": 0.75} and load_test_scores(mr) == {}
    assert (tmp_path / "test_scores-test_mean_rank.tsv").read_text().count("\n") == 3   # the old file, set aside
