"""--workers N: the round's pure parts (the merged scratchpad, the slots; the round's keep rule is in
test_keep_rule.py) and its real plumbing (worktrees on real git, the record of runs in flight with real processes)."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import git  # noqa: E402
from engine.branch import merge_scratchpads
from engine.project import Metric
from engine.repo import dirty_files, sweep_worktrees, worktree
from engine.report import summarize, wall_seconds, write_report
from engine.results import append_row
from engine.runs import _running, stop_orphan, track_run, worker_slots
from engine.util import HarnessError, RUNNING


# ---------------------------------------------------------------- the merged scratchpad

BASE = "# Notes\n## Tried\n- lr 2e-4: baseline\n## Next ideas\n- try warmup\n"


def test_merge_scratchpads_keeps_every_workers_notes():
    w1 = BASE.replace("- try warmup\n", "- try warmup\n- NOTE-A: wider projection\n")
    w2 = "# Notes\n## Tried\n- lr 4e-4: worse\n## Next ideas\n- NOTE-B: label smoothing\n"   # rewrote, deleted
    merged = merge_scratchpads(BASE, {3: w1, 4: w2})
    assert merged.startswith(BASE)   # a worker's deletions delete nothing for the others
    assert merged == BASE + ("\n## Notes of experiment 3\n- NOTE-A: wider projection\n"
                             "\n## Notes of experiment 4\n- lr 4e-4: worse\n- NOTE-B: label smoothing\n")


def test_merge_scratchpads_overlapping_identical_and_empty_notes():
    same = BASE + "- NOTE-C: same idea\n"
    # the same line added at the same place by two workers, one also edits a base line in place
    edited = same.replace("- lr 2e-4: baseline", "- lr 2e-4: baseline (sigma 0.8)")
    merged = merge_scratchpads(BASE, {1: same, 2: edited, 3: BASE, 4: ""})
    assert merged == BASE + ("\n## Notes of experiment 1\n- NOTE-C: same idea\n"
                             "\n## Notes of experiment 2\n- lr 2e-4: baseline (sigma 0.8)\n")
    assert merged.count("NOTE-C") == 1 and "experiment 3" not in merged and "experiment 4" not in merged
    assert merge_scratchpads("", {5: "first note\n", 6: ""}) == "## Notes of experiment 5\nfirst note\n"
    assert merge_scratchpads(BASE, {}) == BASE


# ---------------------------------------------------------------- slots

def test_worker_slots():
    assert worker_slots(4, "0,1,2,3", 4, 16) == [{"AUTORESEARCH_GPUS": g} for g in "0123"]
    assert worker_slots(2, "all", 4, 16) == [{"AUTORESEARCH_GPUS": "0"}, {"AUTORESEARCH_GPUS": "1"}]
    assert worker_slots(2, None, 2, 16) == [{"AUTORESEARCH_GPUS": "0"}, {"AUTORESEARCH_GPUS": "1"}]
    assert worker_slots(2, " 3, 5 ", 8, 16) == [{"AUTORESEARCH_GPUS": "3"}, {"AUTORESEARCH_GPUS": "5"}]
    with pytest.raises(HarnessError, match="needs a GPU per worker, but there are 2 .*--workers 2 or fewer"):
        worker_slots(3, "0,1", 4, 16)
    # no GPU: the cores split evenly, whatever AUTORESEARCH_GPUS says (run.sh uses no GPU either)
    assert worker_slots(2, None, 0, 16) == [{"AUTORESEARCH_CPUS": "8"}] * 2
    assert worker_slots(3, "0,1", 0, 2) == [{"AUTORESEARCH_CPUS": "0.667"}] * 3


# ---------------------------------------------------------------- worktrees (real git)


@pytest.fixture
def repo(scripted_project):
    return scripted_project


def test_a_ctrl_c_during_a_workers_join_still_waits_for_its_run_to_stop():
    """Ctrl-C interrupts the main thread's wait for a worker's run; the clean-up then waits again, and must wait until
    the run has stopped (CPython before 3.13 marks a thread whose join was interrupted as stopped while it runs)."""
    import threading
    from engine.loop import Worker
    from engine.results import Outcome
    cancel, stopped = threading.Event(), threading.Event()

    def run():
        cancel.wait()        # the run stops once its round is cancelled, taking its time (containers removed)
        time.sleep(0.5)
        stopped.set()
        raise KeyboardInterrupt
    w = Worker(0, ".", {}, Outcome(1))
    w.start(run)

    def ctrl_c(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            w.join()
    finally:
        signal.signal(signal.SIGALRM, old)
    cancel.set()
    with pytest.raises(KeyboardInterrupt):   # the run's own end, raised by the second wait
        w.join()
    assert stopped.is_set()

def test_worktrees_are_made_reset_and_swept(repo):
    first = git(repo, "rev-parse", "HEAD")
    path = worktree(1, first)
    assert path == os.path.join(".worktrees", "w1") and (repo / path / "train.py").read_text() == "LR = 1.0\n"
    (repo / path / "train.py").write_text("LR = 2\n")      # a worker's candidate, committed in its worktree
    git(repo / path, "commit", "-qam", "candidate")
    cand = git(repo / path, "rev-parse", "HEAD")
    assert git(repo, "rev-parse", "HEAD") == first and git(repo, "status", "--porcelain") == ""
    git(repo, "reset", "-q", "--hard", cand)               # the round's winner becomes the branch's HEAD
    (repo / path / "train.py").write_text("LR = 9\n")      # half-done edits of the next round ...
    assert worktree(1, cand) == path and (repo / path / "train.py").read_text() == "LR = 2\n"   # ... reset
    assert dirty_files() == []
    # a stale folder (kill -9 between rmtree and prune, or a copy) is replaced by a worktree
    worktree(2, first)
    git(repo, "worktree", "remove", "--force", ".worktrees/w2")
    (repo / ".worktrees" / "w2").mkdir()
    (repo / ".worktrees" / "w2" / "junk").write_text("x")
    assert (repo / worktree(2, first) / "train.py").read_text() == "LR = 1.0\n"
    assert not (repo / ".worktrees" / "w2" / "junk").exists()
    sweep_worktrees()
    assert not (repo / ".worktrees").exists()
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1   # the main checkout only


# ---------------------------------------------------------------- runs in flight (real processes)

def test_every_run_in_flight_is_recorded_and_stopped_after_a_kill(repo):
    (repo / "run.sh").write_text("#!/bin/sh\nsleep 600\n")
    (repo / "run.sh").chmod(0o755)
    (repo / "runs").mkdir()
    procs = [subprocess.Popen(["./run.sh"], start_new_session=True) for _ in range(3)]
    try:
        for k, p in enumerate(procs):
            track_run(f"{k}", p.pid)
        track_run("1", None)                       # one run ended
        assert sorted(map(int, (repo / RUNNING).read_text().split())) == sorted([procs[0].pid, procs[2].pid])
        _running.clear()                           # the harness is killed with -9: its memory is gone
        stop_orphan()                              # the next start
        deadline = time.time() + 10
        while time.time() < deadline and (procs[0].poll() is None or procs[2].poll() is None):
            time.sleep(0.1)
        assert procs[0].poll() == -signal.SIGTERM and procs[2].poll() == -signal.SIGTERM
        assert procs[1].poll() is None                # not recorded any more: left alone
        assert not (repo / RUNNING).exists()
        track_run("x", procs[1].pid)
        track_run("x", None)
        assert not (repo / RUNNING).exists()       # the last run's end removes the record
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)   # the shell and its `sleep`
            p.wait()


# ---------------------------------------------------------------- two workers end to end (real podman, fake model)
# The loop's sandbox test set-up (tests/test_loop.py): a sabotaged train.py scores exactly N_VAL; restoring the text
# encoder scores exactly 36.25, restoring both encoders scores lower (< 0.7 N_VAL), so both pass and the second wins.

from test_loop import (BOOM, IMG_BAD, IMG_OK, TXT_BAD, TXT_OK, alive, containers_of, data,  # noqa: E402,F401
                       env_for, expect, git as git_id, harness, make_repo, rows, wait_for)
from fake_ollama import FakeOllama, tool_call, tool_calls  # noqa: E402

NOTE_A, NOTE_B = "- NOTE-A: the text side was constant\n", "- NOTE-B: both sides were constant\n"
HANG = "    time.sleep(60)\n" + BOOM   # a run that is still training when it is interrupted


def note(text):
    return tool_call("edit_file", path="scratchpad.md", old_text="## Next ideas\n", new_text="## Next ideas\n" + text)


def seed(repo, tag):
    """A recorded baseline (as tests/test_loop.py's seed_baseline) whose start-up and export took 60 s: runs that share
    2 busy cores stay within the allowance."""
    git_id(repo, "checkout", "-q", "-b", f"autoresearch/{tag}")
    head = git(repo, "rev-parse", "HEAD")
    append_row({"experiment": 0, "commit": head, "val_mean_rank": 48.0, "delta": 0.0, "status": "baseline",
                   "description": "baseline", "runs": (48.0, 48.0), "best": 48.0, "sigma": 0.0, "best_commit": head,
                   "phase": "Phase 1: Hyperparameters", "train_wall_seconds": 60.0, "round": 0, "worker": 0},
                  Metric("mean_rank", "minimize"), str(repo / "results.tsv"))


def training(repo, *exps):
    """The runs of these experiments got their go (run_sandbox opens the log then) and both containers of each run in
    flight are up."""
    path = repo / "runs" / ".running"

    def check():
        if not (all((repo / "logs" / f"{e}.log").exists() for e in exps) and path.exists()):
            return False
        pids = path.read_text().split()
        up = subprocess.run(["podman", "ps", "--filter", "label=autoresearch=1", "--filter", "status=running",
                             "--format", "{{.Names}}"], capture_output=True, text=True).stdout.split()
        return len(pids) >= len(exps) and all(sum(n.startswith(f"autoresearch-{p}-") for n in up) == 2 for p in pids)
    return check


def worktrees(repo):
    return subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=repo, capture_output=True,
                          text=True).stdout.count("worktree ")


@pytest.mark.sandbox
def test_two_workers_round_decision_notes_ctrl_c_kill_9_and_resume(tmp_path, data):  # noqa: F811
    repo = make_repo(tmp_path / "repo")
    seed(repo, "w2")

    def first_worker(req):    # a fresh conversation, no earlier proposal of this round
        return len(req["messages"]) == 2 and "Other workers of this round" not in req["messages"][1]["content"]

    def second_worker(req):   # ... lists worker 0's proposal, and asks while worker 0 trains (the overlap)
        wait_for(training(repo, 1), 30, "worker 0's run")
        return len(req["messages"]) == 2 and req["messages"][1]["content"].endswith(
            "make a different one:\n- restore text embeddings")

    round1 = [expect(first_worker, tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK)),
              note(NOTE_A), tool_call("run_experiment", description="restore text embeddings"),
              expect(second_worker, tool_calls(
                  ("edit_file", {"path": "train.py", "old_text": TXT_BAD, "new_text": TXT_OK}),
                  ("edit_file", {"path": "train.py", "old_text": IMG_BAD, "new_text": IMG_OK}))),
              note(NOTE_B), tool_call("run_experiment", description="restore both encoders")]
    hang = [tool_call("edit_file", path="train.py", old_text=BOOM, new_text=HANG),
            tool_call("run_experiment", description="hang")]
    args = ["--resume", "--workers", "2", "--noise-runs", "2"]
    with FakeOllama({"qwen2.5-coder:7b": 32768}, round1) as fake:
        env = env_for(fake.url, data)
        # 1) one round: both candidates pass, the better one is kept, the other is beaten; both notes reach the pad
        p = harness(repo, env, *args, "--max-experiments", "2")
        assert p.returncode == 0 and not fake.errors, p.stdout + p.stderr + "\n".join(fake.errors)
        rs = rows(repo)
        assert [(r["experiment"], r["status"], r["round"], r["worker"]) for r in rs[1:]] == [
            ("1", "discard", "1", "0"), ("2", "keep", "1", "1")], [(r["status"], r["reason"]) for r in rs]
        assert float(rs[1]["val_mean_rank"]) == 36.25 and float(rs[2]["val_mean_rank"]) < 36.25
        assert rs[1]["reason"].startswith("beaten in round by experiment 2 (")
        assert rs[1]["best_commit"] == rs[0]["commit"] != rs[2]["commit"]
        assert "after 3 run(s)" in rs[2]["reason"] and rs[2]["best_commit"] == rs[2]["commit"]
        pad = (repo / "scratchpad.md").read_text()
        assert "## Notes of experiment 1\n" + NOTE_A in pad and "## Notes of experiment 2\n" + NOTE_B in pad
        assert git(repo, "log", "-1", "--format=%s") == "scratchpad: notes of round 1"
        assert git(repo, "rev-parse", "HEAD~1") == rs[2]["commit"]
        kept = (repo / "train.py").read_text()
        assert TXT_OK in kept and IMG_OK in kept and git(repo, "status", "--porcelain") == ""
        assert not (repo / ".worktrees").exists() and worktrees(repo) == 1
        assert "worker 0 " in p.stdout and "worker 1 " in p.stdout   # the summary's slot utilization

        # 2) Ctrl-C while both workers train: both runs stopped and recorded interrupted, no worktree, clean tree
        fake.add(*hang, *hang)
        p = subprocess.Popen([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(training(repo, 3, 4), 120, "both workers' runs")
        pids = [int(x) for x in (repo / "runs" / ".running").read_text().split()]
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, err
        assert time.time() - t0 < 45    # stopped, not waited for: each run would sleep 60 s, then time out
        assert not any(map(alive, pids)) and all(containers_of(x) == [] for x in pids)
        assert [(r["experiment"], r["status"], r["round"], r["worker"]) for r in rows(repo)[3:]] == [
            ("3", "interrupted", "2", "0"), ("4", "interrupted", "2", "1")]
        assert (repo / "train.py").read_text() == kept and git(repo, "status", "--porcelain") == ""
        assert not (repo / ".worktrees").exists() and worktrees(repo) == 1 and not (repo / "runs" / ".running").exists()

        # 3) kill -9 while both train: the runs live on; the next start stops them and records both from the worktrees
        fake.add(*hang, *hang)
        p = subprocess.Popen([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(training(repo, 5, 6), 120, "both workers' runs")
        orphans = [int(x) for x in (repo / "runs" / ".running").read_text().split()]
        p.kill()
        p.communicate(timeout=30)
        assert all(map(alive, orphans))
        # 4) --resume continues with the next round (here both proposals are refused: no run)
        same = tool_call("run_experiment", description="nothing changed")
        fake.add(same, same)
        p = harness(repo, env, *args, "--max-experiments", "4", "--max-invalid", "0")
        assert p.returncode == 0 and fake.remaining == 0, p.stdout + p.stderr
    assert not any(map(alive, orphans)) and all(containers_of(x) == [] for x in orphans)
    rs = rows(repo)
    assert [(r["experiment"], r["status"], r["round"], r["worker"]) for r in rs[5:]] == [
        ("5", "interrupted", "3", "0"), ("6", "interrupted", "3", "1"), ("7", "invalid", "4", "0"),
        ("8", "invalid", "4", "1")], rs
    assert all("recovered on resume" in r["reason"] and r["commit"] for r in rs[5:7])
    assert (repo / "train.py").read_text() == kept and git(repo, "status", "--porcelain") == ""
    assert not (repo / ".worktrees").exists() and worktrees(repo) == 1
    assert (repo / "progress.png").stat().st_size > 10_000


@pytest.mark.sandbox
def test_kill_9_in_the_run_after_the_winners_keep_keeps_it_on_resume(tmp_path, data):  # noqa: F811
    """kill -9 while a round's winner runs once more after its keep: --resume records the keep from its keep commit
    (round and worker included), the beaten candidate stays recorded, both workers' notes reach the pad, nothing is
    left."""
    repo = make_repo(tmp_path / "repo")
    seed(repo, "w9")
    hang2 = "    if SEED == 4:\n        time.sleep(120)\n" + BOOM   # only the run after the keep hangs
    round1 = [tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK), note(NOTE_A),
              tool_call("run_experiment", description="restore text embeddings"),
              tool_calls(("edit_file", {"path": "train.py", "old_text": TXT_BAD, "new_text": TXT_OK}),
                         ("edit_file", {"path": "train.py", "old_text": IMG_BAD, "new_text": IMG_OK}),
                         ("edit_file", {"path": "train.py", "old_text": BOOM, "new_text": hang2})),
              note(NOTE_B), tool_call("run_experiment", description="restore both encoders")]
    args = ["--resume", "--workers", "2", "--noise-runs", "2", "--max-experiments", "2"]
    with FakeOllama({"qwen2.5-coder:7b": 32768}, round1) as fake:
        env = env_for(fake.url, data)
        p = subprocess.Popen([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(training(repo, "2-s4"), 600, "the winner's run after its keep")
        orphan = int((repo / "runs" / ".running").read_text().split()[0])
        p.kill()
        p.communicate(timeout=30)
        assert alive(orphan) and fake.remaining == 0
        p = harness(repo, env, *args)   # both are recorded then: nothing more to run
        assert p.returncode == 0, p.stdout + p.stderr
    assert not alive(orphan) and containers_of(orphan) == []
    rs = rows(repo)
    assert [(r["experiment"], r["status"], r["round"], r["worker"]) for r in rs[1:]] == [
        ("1", "discard", "1", "0"), ("2", "keep", "1", "1")], [(r["status"], r["reason"]) for r in rs]
    assert rs[1]["reason"].startswith("beaten in round by experiment 2 (")
    assert rs[2]["reason"].startswith("recovered from the keep commit on resume (3 run(s))")
    assert subprocess.run(["git", "merge-base", "--is-ancestor", rs[2]["commit"], "HEAD"], cwd=repo).returncode == 0
    pad = (repo / "scratchpad.md").read_text()
    assert "## Notes of experiment 1\n" + NOTE_A in pad and "## Notes of experiment 2\n" + NOTE_B in pad
    kept = (repo / "train.py").read_text()
    assert TXT_OK in kept and IMG_OK in kept and git(repo, "status", "--porcelain") == ""
    assert not (repo / ".worktrees").exists() and worktrees(repo) == 1


# ---------------------------------------------------------------- report: rounds, experiments per hour, slots

def round_rows():
    """A baseline (round 0, 100 s), then two rounds of two workers that overlap: round 1 from t=100 to t=300, round 2
    from t=300 to t=450."""
    def row(exp, rnd, worker, start, end, run, status="discard"):
        return {"experiment": str(exp), "status": status, "val_mean_rank": str(50 - exp), "best": "50", "runs": "",
                "description": f"idea {exp}", "best_commit": "a",
                "round": str(rnd), "worker": str(worker), "wall_seconds": str(end - start), "run_seconds": str(run),
                "model_seconds": "10", "finished": f"2026-01-01T00:{end // 60:02d}:{end % 60:02d}"}
    return [row(0, 0, 0, 0, 100, 100, "baseline"), row(1, 1, 0, 100, 290, 150), row(2, 1, 1, 110, 300, 180),
            row(3, 2, 0, 300, 440, 120), row(4, 2, 1, 310, 450, 130)]


def test_report_counts_overlapping_workers_once():
    rows = round_rows()
    assert wall_seconds(rows) == 450
    s = summarize(rows)
    assert s["per_hour"] == pytest.approx(4 / 450 * 3600) and s["experiments"] == 4
    assert s["slots"] == {0: pytest.approx(370 / 450), 1: pytest.approx(310 / 450)}
    # one worker: each experiment its own round, the wall time is the sum of the rows' (as before rounds)
    solo = [dict(r, round=str(k), worker="0") for k, r in enumerate(rows)]
    assert wall_seconds(solo) == 100 + 190 + 190 + 140 + 140 and list(summarize(solo)["slots"]) == [0]


def test_progress_png_shades_every_other_round(tmp_path):
    import matplotlib.image
    shaded = (239, 245, 250)   # the round band (#1f77b4 at alpha 0.07) over the white axes

    def band_pixels(rows):
        write_report(rows, Metric("mean_rank", "minimize"), str(tmp_path / "p.png"), quiet=True)
        img = (matplotlib.image.imread(str(tmp_path / "p.png"))[:, :, :3] * 255).round()
        return int((abs(img - shaded) <= 2).all(axis=2).sum())

    assert band_pixels(round_rows()) > 5000
    assert band_pixels([dict(r, round=str(k)) for k, r in enumerate(round_rows())]) < 100   # one worker: no bands
