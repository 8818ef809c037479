"""--launcher slurm: every run is a SLURM job on a real one-node cluster (tests/slurm_cluster.py: munged, slurmctld and
slurmd on loopback, started as root), driven through autoresearch.py with the scripted Ollama server.

The loop's runs use the same sabotaged train.py as tests/test_loop.py (val_mean_rank == n_val until the text
encoder is restored), so keep and discard are deterministic with a 2-second budget.
"""
import os
import signal
import subprocess
import sys
import time
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from engine.judge import parse_metrics
from engine.repo import check_argv
from engine.runs import job_name, launch_argv, slurm_site_args, slurm_verdict, srun_argv
from engine.util import HarnessError
from engine.project import Metric  # noqa: E402

MR = Metric("mean_rank", "minimize")   # the template's metric
from fake_ollama import FakeOllama, tool_call  # noqa: E402
from slurm_cluster import Cluster, ClusterError  # noqa: E402
from test_loop import (BOOM, TXT_BAD, TXT_OK, alive, containers_of, data, env_for, git, make_repo,  # noqa: E402,F401
                       rows, wait_for)

TAG = "sl"
IMPROVE = [tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK),
           tool_call("run_experiment", description="restore text embeddings")]
CRASH = [tool_call("edit_file", path="train.py", old_text=BOOM, new_text="    raise RuntimeError('boom')\n" + BOOM),
         tool_call("run_experiment", description="crash on purpose")]
HANG = [tool_call("edit_file", path="train.py", old_text=BOOM,
                  new_text="    print('HANG', flush=True)\n    time.sleep(600)\n" + BOOM),
        tool_call("run_experiment", description="hang until stopped")]


# ---------------------------------------------------------------- pure parts: no cluster

def test_srun_argv_and_allowlist():
    argv = srun_argv(["--partition=gpu", "--account=lab"], job_name("nov27", "3"), 20, "/shared/repo",
                        ["./run.sh"])
    assert argv == ["srun", "--partition=gpu", "--account=lab", "--job-name=autoresearch-nov27-3", "--time=20",
                    "--nodes=1", "--ntasks=1", "--chdir=/shared/repo", "--export=ALL", "--gres=gpu:1", "./run.sh"]
    # the site's own GPU request (a typed one, or none on a CPU cluster) replaces ours
    for site in (["--gres=gpu:a100:1"], ["--gres=none"], ["--gpus=1"], ["--gpus-per-node=2"], ["-G1"]):
        assert "--gres=gpu:1" not in srun_argv(site, "n", 1, "/r", ["./run.sh"]), site
    assert "--gres=gpu:1" in srun_argv(["--gres-flags=enforce-binding"], "n", 1, "/r", ["./run.sh"])
    # --time is the budget plus the allowance, rounded up to minutes; the local launcher runs the command itself
    args = types.SimpleNamespace(launcher="slurm", tag="nov27", time_budget=300)
    os.environ.pop("AUTORESEARCH_SLURM_ARGS", None)
    os.environ.pop("AUTORESEARCH_EVAL_TIMEOUT", None)
    run = launch_argv(args, "7-s2", ["./run.sh", "--test", "runs/7"])
    assert run[-3:] == ["./run.sh", "--test", "runs/7"] and "--job-name=autoresearch-nov27-7-s2" in run
    assert "--time=19" in run, run   # 300 s budget + 120 s grace + 600 s evaluation + 120 s slack = 19 min
    assert launch_argv(types.SimpleNamespace(launcher="local"), "7", ["./run.sh"]) == ["./run.sh"]
    # site settings: options only, each value joined by '=' (a stray word would become srun's command)
    assert slurm_site_args({"AUTORESEARCH_SLURM_ARGS": "--partition=gpu '--comment=a b'"}) == \
        ["--partition=gpu", "--comment=a b"]
    with pytest.raises(HarnessError, match="join each value"):
        slurm_site_args({"AUTORESEARCH_SLURM_ARGS": "-p gpu"})

    for ok in (argv, srun_argv([], "n", 1, "/r", ["./run.sh", "--test", "runs/0"]),
               srun_argv([], "n", 1, "/r", ["sha256sum", "--", "/r/run.sh"]),
               ["scancel", "12", "13"],
               ["squeue", "--me", "--noheader", "--format=%i|%T|%j|%Z"], ["sacct", "--noheader", "--name=x"]):
        assert check_argv(ok) is None, ok
    for bad in (["srun", "bash", "-c", "id"], ["srun", "-p", "gpu", "./run.sh"], ["srun", "./run.sh", "--test"],
                ["srun", "./run.sh", "x", "y"], ["srun", "--pty", "python3", "train.py"], ["sbatch", "--wrap=id"],
                ["sbatch", "--wait", "--job-name=x", "./run.sh"],
                ["srun"], ["scancel", "--me", "all"], ["squeue", "x"], ["sacct", "; rm -rf /"], ["sinfo"],
                ["salloc", "./run.sh"], "srun ./run.sh"):
        assert check_argv(bad), bad


def test_slurm_verdict():
    ok = "train| step 1\n--- trusted evaluation ---\nval_mean_rank: 12.5\ntotal_seconds: 9.1\n"
    assert slurm_verdict(7, "COMPLETED", 0, ok, parse_metrics(ok), MR) == ("ok", "")
    # lost jobs: SLURM's state is the reason, whatever run.sh managed to print
    assert slurm_verdict(7, "CANCELLED", 0, ok, parse_metrics(ok), MR) == ("interrupted", "SLURM job 7 CANCELLED")
    for state, status in (("NODE_FAIL", "interrupted"), ("PREEMPTED", "interrupted"), ("BOOT_FAIL", "interrupted"),
                          ("TIMEOUT", "timeout"), ("OUT_OF_MEMORY", "crash")):
        assert slurm_verdict(8, state, 143, "train| x\n", {}, MR) == (status, f"SLURM job 8 {state}")
    # a failed run keeps run.sh's own last line as the reason; srun's and slurmstepd's lines after it are skipped
    out = ("train| boom\nrun.sh: FAILED train.py exited with code 1\nsrun: error: vm: task 0: Exited with exit "
           "code 1\nslurmstepd-vm: error: something\n")
    assert slurm_verdict(9, "FAILED", 1, out, {}, MR) == ("crash", "run.sh exit 1: run.sh: FAILED train.py exited "
                                                                  "with code 1")
    out = "run.sh: TIMEOUT training killed after 5s\nsrun: error: vm: task 0: Exited with exit code 124\n"
    assert slurm_verdict(9, "FAILED", 124, out, {}, MR) == ("timeout", "run.sh: TIMEOUT training killed after 5s")
    # a forged srun line cannot hide the verdict: train.py's lines carry the prefix
    out = "train| srun: x\nrun.sh: FAILED train.py exited with code 1\n"
    assert slurm_verdict(9, "FAILED", 1, out, {}, MR)[1].endswith("code 1")
    # no job at all (srun refused it): one clear error, not a crash the model would be asked to fix
    with pytest.raises(HarnessError, match="srun started no job"):
        slurm_verdict(None, None, 1, "srun: error: Unable to allocate resources: QOSMaxSubmitJobPerUserLimit\n", {}, MR)


# ---------------------------------------------------------------- a real cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip(f"the SLURM test cluster needs root (slurmd starts jobs as their users); running as uid "
                    f"{os.geteuid()}")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except ClusterError as e:
        c.stop()
        pytest.fail(f"the SLURM test cluster did not start: {e}")
    yield c
    c.stop()


def slurm_env(c, url, data):
    env = dict(env_for(url, data), SLURM_CONF=c.conf, AUTORESEARCH_SLURM_ARGS="--gres=none")
    return env


def harness_args(*extra):
    return [sys.executable, "autoresearch.py", "--launcher", "slurm", "--noise-runs", "2", *extra]


def run_sh_pid(repo):
    """The run.sh of this repository's job, in its checkout or a worker's worktree (on this one-node cluster the compute
    node is this machine). run.sh execs `python3 -m engine.sandbox <its own path> ...`, and works in a private dir."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
            if argv[1:3] == ["-m", "engine.sandbox"] and os.path.normpath(argv[3]) in (
                    str(repo / "run.sh"), str(repo / ".worktrees" / "w0" / "run.sh")):
                found.append(int(pid))
        except (OSError, IndexError, UnicodeDecodeError):
            pass
    return min(found, default=None)


def job_state(c, label, tag=TAG):
    out = c.squeue("--states=all", f"--name={job_name(tag, label)}", "--format=%T").split()
    return out[-1] if out else None


def hung(c, repo, exp):
    """Waits until experiment `exp`'s job runs train.py in its container; returns run.sh's pid."""
    wait_for(lambda: (repo / "logs" / f"{exp}.log").exists() and "train| HANG" in (repo / "logs" / f"{exp}.log")
             .read_text(), 300, f"experiment {exp} to hang in its SLURM job")
    assert job_state(c, str(exp)) == "RUNNING"
    pid = run_sh_pid(repo)
    assert pid and containers_of(pid)
    return pid


def test_slurm_launcher_end_to_end(cluster, tmp_path, data):
    c = cluster
    repo = make_repo(tmp_path / "repo")
    with FakeOllama({"qwen2.5-coder:7b": 32768}, HANG + IMPROVE + HANG) as fake:
        env = slurm_env(c, fake.url, data)
        # 1) baseline, then experiment 1 hangs and its job is cancelled from outside (an admin, a preemption):
        #    recorded `interrupted` with SLURM's state, it does not count, and the loop goes on: experiment 2 keeps
        p = subprocess.Popen(harness_args("--tag", TAG, "--max-experiments", "2"), cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pid = hung(c, repo, 1)
        subprocess.run(["scancel", f"--name={job_name(TAG, '1')}"], env=c.env, check=True)
        wait_for(lambda: len(rows(repo)) == 2, 120, "experiment 1 to be recorded")
        assert not alive(pid) and containers_of(pid) == []
        job1 = c.squeue("--states=all", f"--name={job_name(TAG, '1')}", "--format=%i").strip()
        assert rows(repo)[1]["status"] == "interrupted" and rows(repo)[1]["reason"] == f"SLURM job {job1} CANCELLED"

        # 2) then Ctrl-C while experiment 3 runs: the harness cancels its job (CANCELLED, not srun's FAILED)
        pid = hung(c, repo, 3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, out + err
        wait_for(lambda: job_state(c, "3") != "COMPLETING", 60, "job 3 to finish cancelling")   # run.sh cleans up
        assert job_state(c, "3") == "CANCELLED" and not alive(pid) and containers_of(pid) == []
        rs = rows(repo)
        assert [(r["experiment"], r["status"]) for r in rs] == [("0", "baseline"), ("1", "interrupted"),
                                                                ("2", "keep"), ("3", "interrupted")], rs
        assert float(rs[2]["val_mean_rank"]) < 48 and rs[3]["reason"] == "Ctrl-C / SIGTERM"

        # 3) kill -9 while experiment 4 runs: its job lives on (srun has its own session) ...
        fake.add(*HANG)
        p = subprocess.Popen(harness_args("--resume", "--max-experiments", "2"), cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pid = hung(c, repo, 4)
        p.kill()
        p.communicate(timeout=30)
        time.sleep(1)
        assert job_state(c, "4") == "RUNNING" and alive(pid)
        # ... until --resume cancels it, records experiment 4 once, and runs experiment 5 (a crash) as a SLURM job
        fake.add(*CRASH)
        r = subprocess.run(harness_args("--resume", "--max-experiments", "2", "--fix-attempts", "0"), cwd=repo, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert "cancelling SLURM job" in r.stdout and "test_mean_rank" in r.stdout
        wait_for(lambda: job_state(c, "4") != "COMPLETING", 60, "job 4 to finish cancelling")   # run.sh cleans up
        assert job_state(c, "4") == "CANCELLED" and not alive(pid) and containers_of(pid) == []
        assert fake.remaining == 0

    rs = rows(repo)
    assert [(r["experiment"], r["status"]) for r in rs] == [
        ("0", "baseline"), ("1", "interrupted"), ("2", "keep"), ("3", "interrupted"), ("4", "interrupted"),
        ("5", "crash")], rs
    assert "killed during the run" in rs[4]["reason"]
    assert rs[5]["reason"] == "run.sh exit 1: run.sh: FAILED train.py exited with code 1; log: logs/5.log"   # not srun's
    # every run was a SLURM job of this repository, named after the tag and the experiment
    comp = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in open(c.jobcomp)]
    # (in the checkout: the baseline, the incumbent's re-measure, the run after the keep; in the worker's worktree:
    # the candidates' runs)
    ours = {(j["Name"], j["JobState"]) for j in comp if j["WorkDir"] in (str(repo), str(repo / ".worktrees" / "w0"))}
    assert ours == {(job_name(TAG, name), state) for name, state in (
        ("check", "COMPLETED"), ("0", "COMPLETED"), ("0-s2", "COMPLETED"), ("1", "CANCELLED"), ("2", "COMPLETED"),
        ("2-i3", "COMPLETED"), ("2-s2", "COMPLETED"), ("2-s3", "COMPLETED"), ("2-s4", "COMPLETED"),
        ("3", "CANCELLED"), ("4", "CANCELLED"), ("5", "FAILED"), ("test-0", "COMPLETED"), ("test-2", "COMPLETED"))}, \
        sorted(ours)
    assert "train| HANG" in (repo / "logs" / "1.log").read_text()
    # nothing left behind: no job, no check token; the tree is clean on the best commit
    assert c.squeue() == ""
    assert not [f for f in os.listdir(repo / "runs") if f.startswith(".slurm-check")]
    assert git(repo, "status", "--porcelain") == "" and git(repo, "rev-parse", "HEAD") == rs[2]["commit"]
    src = (repo / "train.py").read_text()
    assert TXT_OK in src and "HANG" not in src


def test_slurm_startup_check(cluster, tmp_path, tmp_path_factory, data):
    """One clear message each: site settings that are not options, a request SLURM refuses, and a compute node
    that does not see the data at the same path (its slurmd runs in a mount namespace where the data is hidden)."""
    repo = make_repo(tmp_path / "repo")

    def refused(env, *extra):
        p = subprocess.run(harness_args("--tag", "chk", *extra), cwd=repo, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
        return p.stderr

    with FakeOllama({"qwen2.5-coder:7b": 32768}) as fake:
        env = slurm_env(cluster, fake.url, data)
        assert "join each value to its option with '='" in refused(dict(env, AUTORESEARCH_SLURM_ARGS="-p debug"))
        # runs ask for a GPU unless told otherwise; this cluster has none, and the start-up job says so
        err = refused(dict(env, AUTORESEARCH_SLURM_ARGS=""))
        assert "SLURM start-up job failed" in err and "Invalid generic resource" in err and "--gres=none" in err
        blind = Cluster(tmp_path_factory.mktemp("blind"), slurmd_prefix=[
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs none {data} && exec "$0" "$@"'])
        try:
            blind.start()
            err = refused(dict(env, SLURM_CONF=blind.conf))
        finally:
            blind.stop()
        assert f"does not see {data}/meta.json as this machine does (missing)" in err, err
        assert "shared with the compute nodes, at the same paths" in err
        assert fake.chat_requests == []
    assert git(repo, "status", "--porcelain") == "" and not os.path.exists(repo / "results.tsv")
    assert not [f for f in os.listdir(repo / "runs") if f.startswith(".slurm-check")]


# The workers' test here, not in test_workers.py: the SLURM tests share one munged, so they run in one file (pytest -n).
from test_workers import HANG as WORKER_HANG, seed as seed_round  # noqa: E402

WORKERS_TAG = "slw"   # its own tag: the module's earlier jobs stay listed a while


def test_two_workers_as_slurm_jobs_cancelled_on_ctrl_c(cluster, tmp_path, data):  # noqa: F811
    """--launcher slurm: each worker's run is its own job, started in its worktree; Ctrl-C cancels them all."""
    repo = make_repo(tmp_path / "repo")
    seed_round(repo, WORKERS_TAG)
    hang = [tool_call("edit_file", path="train.py", old_text=BOOM, new_text=WORKER_HANG),
            tool_call("run_experiment", description="hang")]
    with FakeOllama({"qwen2.5-coder:7b": 32768}, hang + hang) as fake:
        p = subprocess.Popen([sys.executable, "autoresearch.py", "--launcher", "slurm", "--resume", "--workers", "2",
                              "--noise-runs", "2"], cwd=repo, env=slurm_env(cluster, fake.url, data),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: job_state(cluster, "1", WORKERS_TAG) == job_state(cluster, "2", WORKERS_TAG) == "RUNNING", 180,
                 "both jobs to run")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, out + err
    for label in ("1", "2"):
        wait_for(lambda: job_state(cluster, label, WORKERS_TAG) != "COMPLETING", 60,
                 f"job {label} to finish cancelling")
        assert job_state(cluster, label, WORKERS_TAG) == "CANCELLED"
    comp = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in open(cluster.jobcomp)]
    assert {j["WorkDir"] for j in comp if j["Name"] in (job_name(WORKERS_TAG, "1"), job_name(WORKERS_TAG, "2"))} == {
        str(repo / ".worktrees" / "w0"), str(repo / ".worktrees" / "w1")}
    assert [(r["experiment"], r["status"]) for r in rows(repo)[1:]] == [("1", "interrupted"), ("2", "interrupted")]
    assert cluster.squeue() == "" and git(repo, "status", "--porcelain") == "" and not (repo / ".worktrees").exists()
