"""--workers N: the round's pure parts (the N-corrected threshold, the round decision, the merged scratchpad, the
slots) and its real plumbing (worktrees on real git, the record of runs in flight with real processes)."""
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import autoresearch as ar  # noqa: E402


# ---------------------------------------------------------------- the N-corrected threshold (Šidák)

def test_sidak_z():
    assert ar.sidak_z(2.0, 1) == 2.0 and ar.sidak_z(3.0, 1) == 3.0          # N=1: the rule of today, exactly
    assert [round(ar.sidak_z(2.0, n), 3) for n in (2, 4, 8)] == [2.275, 2.528, 2.762]
    nd = statistics.NormalDist()
    for z in (1.0, 2.0, 3.0, 5.0):
        for n in (2, 3, 4, 8, 64):
            zn = ar.sidak_z(z, n)
            # the chance that the best of n pure-noise candidates passes zn is the chance one candidate passes z
            assert 1 - nd.cdf(zn) ** n == pytest.approx(1 - nd.cdf(z), rel=1e-9)
            assert zn > ar.sidak_z(z, n - 1)


# ---------------------------------------------------------------- the round decision

def test_decide_round_keeps_the_best_passing_candidate():
    # best 50, sigma 1, z 2 (N=3: 2.42): 46 and 45 pass, 49 does not
    winner, out = ar.decide_round(50.0, 1.0, {3: 46.0, 4: 49.0, 5: 45.0}, ar.sidak_z(2.0, 3))
    assert winner == 5 and out[5][0] == "keep" and out[5][1] == -5.0
    assert out[3][0] == "discard" and out[3][3].startswith("beaten in round by experiment 5 (delta -4,")
    assert out[4][0] == "discard" and out[4][3].endswith("not > threshold")
    # one that passes z but not the round's z_N is not kept
    winner, out = ar.decide_round(50.0, 1.0, {1: 47.8, 2: 51.0}, ar.sidak_z(2.0, 2))
    assert winner is None and out[1][0] == "discard" and 2.0 < 50.0 - 47.8 < out[1][2]
    # ties go to the earlier experiment
    assert ar.decide_round(50.0, 1.0, {7: 40.0, 6: 40.0}, 2.0)[0] == 6
    # with --confirm the best passing candidate goes on to its second seed, the others are beaten
    winner, out = ar.decide_round(50.0, 1.0, {1: 49.0, 2: 48.0}, 2.0, confirm=True)
    assert winner == 2 and out[2][0] == "confirm" and out[1][0] == "discard"


# ---------------------------------------------------------------- the merged scratchpad

BASE = "# Notes\n## Tried\n- lr 2e-4: baseline\n## Next ideas\n- try warmup\n"


def test_merge_scratchpads_keeps_every_workers_notes():
    w1 = BASE.replace("- try warmup\n", "- try warmup\n- NOTE-A: wider projection\n")
    w2 = "# Notes\n## Tried\n- lr 4e-4: worse\n## Next ideas\n- NOTE-B: label smoothing\n"   # rewrote, deleted
    merged = ar.merge_scratchpads(BASE, {3: w1, 4: w2})
    assert merged.startswith(BASE)   # a worker's deletions delete nothing for the others
    assert merged == BASE + ("\n## Notes of experiment 3\n- NOTE-A: wider projection\n"
                             "\n## Notes of experiment 4\n- lr 4e-4: worse\n- NOTE-B: label smoothing\n")


def test_merge_scratchpads_overlapping_identical_and_empty_notes():
    same = BASE + "- NOTE-C: same idea\n"
    # the same line added at the same place by two workers, one also edits a base line in place
    edited = same.replace("- lr 2e-4: baseline", "- lr 2e-4: baseline (sigma 0.8)")
    merged = ar.merge_scratchpads(BASE, {1: same, 2: edited, 3: BASE, 4: ""})
    assert merged == BASE + ("\n## Notes of experiment 1\n- NOTE-C: same idea\n"
                             "\n## Notes of experiment 2\n- lr 2e-4: baseline (sigma 0.8)\n")
    assert merged.count("NOTE-C") == 1 and "experiment 3" not in merged and "experiment 4" not in merged
    assert ar.merge_scratchpads("", {5: "first note\n", 6: ""}) == "## Notes of experiment 5\nfirst note\n"
    assert ar.merge_scratchpads(BASE, {}) == BASE


# ---------------------------------------------------------------- slots

def test_worker_slots():
    assert ar.worker_slots(4, "0,1,2,3", 4, 16) == [{"AUTORESEARCH_GPUS": g} for g in "0123"]
    assert ar.worker_slots(2, "all", 4, 16) == [{"AUTORESEARCH_GPUS": "0"}, {"AUTORESEARCH_GPUS": "1"}]
    assert ar.worker_slots(2, None, 2, 16) == [{"AUTORESEARCH_GPUS": "0"}, {"AUTORESEARCH_GPUS": "1"}]
    assert ar.worker_slots(2, " 3, 5 ", 8, 16) == [{"AUTORESEARCH_GPUS": "3"}, {"AUTORESEARCH_GPUS": "5"}]
    with pytest.raises(ar.HarnessError, match="needs a GPU per worker, but there are 2 .*--workers 2 or fewer"):
        ar.worker_slots(3, "0,1", 4, 16)
    # no GPU: the cores split evenly, whatever AUTORESEARCH_GPUS says (run.sh uses no GPU either)
    assert ar.worker_slots(2, None, 0, 16) == [{"AUTORESEARCH_CPUS": "8"}] * 2
    assert ar.worker_slots(3, "0,1", 0, 2) == [{"AUTORESEARCH_CPUS": "0.667"}] * 3


# ---------------------------------------------------------------- worktrees (real git)

def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for k in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{k}_NAME", "t")
        monkeypatch.setenv(f"GIT_{k}_EMAIL", "t@t")
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "train.py").write_text("LR = 1\n")
    (tmp_path / ".gitignore").write_text(".worktrees/\nruns/\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "init")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_worktrees_are_made_reset_and_swept(repo):
    first = git(repo, "rev-parse", "HEAD")
    path = ar.worktree(1, first)
    assert path == os.path.join(".worktrees", "w1") and (repo / path / "train.py").read_text() == "LR = 1\n"
    (repo / path / "train.py").write_text("LR = 2\n")      # a worker's candidate, committed in its worktree
    git(repo / path, "commit", "-qam", "candidate")
    cand = git(repo / path, "rev-parse", "HEAD")
    assert git(repo, "rev-parse", "HEAD") == first and git(repo, "status", "--porcelain") == ""
    git(repo, "reset", "-q", "--hard", cand)               # the round's winner becomes the branch's HEAD
    (repo / path / "train.py").write_text("LR = 9\n")      # half-done edits of the next round ...
    assert ar.worktree(1, cand) == path and (repo / path / "train.py").read_text() == "LR = 2\n"   # ... reset
    assert ar.dirty_files() == []
    # a stale folder (kill -9 between rmtree and prune, or a copy) is replaced by a worktree
    ar.worktree(2, first)
    git(repo, "worktree", "remove", "--force", ".worktrees/w2")
    (repo / ".worktrees" / "w2").mkdir()
    (repo / ".worktrees" / "w2" / "junk").write_text("x")
    assert (repo / ar.worktree(2, first) / "train.py").read_text() == "LR = 1\n"
    assert not (repo / ".worktrees" / "w2" / "junk").exists()
    ar.sweep_worktrees()
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
            ar.track_run(f"{k}", p.pid)
        ar.track_run("1", None)                       # one run ended
        assert sorted(map(int, (repo / ar.RUNNING).read_text().split())) == sorted([procs[0].pid, procs[2].pid])
        ar._running.clear()                           # the harness is killed with -9: its memory is gone
        ar.stop_orphan()                              # the next start
        deadline = time.time() + 10
        while time.time() < deadline and (procs[0].poll() is None or procs[2].poll() is None):
            time.sleep(0.1)
        assert procs[0].poll() == -signal.SIGTERM and procs[2].poll() == -signal.SIGTERM
        assert procs[1].poll() is None                # not recorded any more: left alone
        assert not (repo / ar.RUNNING).exists()
        ar.track_run("x", procs[1].pid)
        ar.track_run("x", None)
        assert not (repo / ar.RUNNING).exists()       # the last run's end removes the record
    finally:
        for p in procs:
            p.kill()
            p.wait()
