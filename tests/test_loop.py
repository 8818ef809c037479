"""End to end: autoresearch.py driven by the scripted Ollama server (tests/fake_ollama.py, through the real ollama
client), real git in a temp repo, the real run.sh (AUTORESEARCH_IMAGE=host) and real training on tiny data.

To make keep/discard deterministic with a 2-second budget, the temp repo's train.py is sabotaged: both encoders
return a constant, so every rank ties at n (val_mean_rank == n_val exactly). "Improving" restores the text
encoder (image->text ranks become ~n/2), "worsening" sabotages it again.

Tests marked `sandbox` run experiments through run.sh; the others record a baseline (seed_baseline) and end their
experiments before a run, so they need no podman and run for a normal user too.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
from conftest import GIT_IDENTITY, TINY_TRAINER, TINY_TRAINER_MAIN, assert_plot_marks, copy_into, git  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import engine.runs  # noqa: E402  (monkeypatched below)
from engine.agent import LLMAgent, make_client
from engine.judge import pooled_cv
from engine.project import project_metric
from engine.results import Outcome, append_row, load_results
from engine.runs import run_sandbox
from fake_ollama import (FakeOllama, Model, content_tool_call, delay, error, server_down, text,  # noqa: E402
                         tool_call, tool_calls)

N_VAL = 48
IMG_OK = "        return self.proj(self.vit(self.prep(images)))\n"
TXT_OK = "        return self.proj(pooled)\n"
IMG_BAD = "        return self.proj(self.vit(self.prep(images))) * 0 + 1\n"
TXT_BAD = "        return self.proj(pooled) * 0 + 1\n"
BOOM = "    torch.manual_seed(SEED)\n"
FILES = ["autoresearch.py", "engine", "train.py", "run.sh", "prepare_data.py", "program.md",
         "scratchpad.md", ".gitignore"]






@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", str(d), "--n-train", "128",
                    "--n-val", str(N_VAL), "--n-test", "40"], check=True, capture_output=True)
    return d


def make_repo(path):
    path.mkdir()
    copy_into(path, FILES)
    src = (path / "train.py").read_text()
    assert src.count(IMG_OK) == 1 and src.count(TXT_OK) == 1 and src.count(BOOM) == 1
    (path / "train.py").write_text(src.replace(IMG_OK, IMG_BAD).replace(TXT_OK, TXT_BAD))
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "template")
    return path


def env_for(url, data):
    env = dict(os.environ, OLLAMA_HOST=url, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data),
               AUTORESEARCH_TIME_BUDGET="2", PYTHONUNBUFFERED="1", **GIT_IDENTITY)
    env.pop("AUTORESEARCH_SANDBOX", None)
    return env


def harness(repo, env, *args, timeout=600):
    p = subprocess.run([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p


def rows(repo):
    return load_results(str(repo / "results.tsv"))


def seed_baseline(repo, tag, value=N_VAL):
    """A run on branch autoresearch/<tag> whose baseline is recorded (constant encoders score exactly N_VAL, sigma
    0): --resume continues it with model experiments, without running the baseline in the sandbox."""
    git(repo, "checkout", "-q", "-b", f"autoresearch/{tag}")
    head = git(repo, "rev-parse", "HEAD")
    append_row({"experiment": 0, "commit": head, "val_mean_rank": value, "delta": 0, "status": "baseline",
                   "description": "baseline", "runs": f"{value},{value}", "best": value, "sigma": 0,
                   "best_commit": head, "phase": "Phase 1: Hyperparameters", "time_budget": 2},
                  project_metric(str(repo)), str(repo / "results.tsv"))
    return head


def last_tool_result(req):
    m = req["messages"][-1]
    assert m["role"] == "tool", m
    return m["content"]


def expect(check, reply):
    """A scripted reply that first checks the request (what the harness sent back): `check` must return True. A
    failed check is answered with a 500 and fails the test (assert_no_failed_checks, or the fake's `with` block)."""
    def fn(req):
        assert check(req) is True, f"check failed on the request ending with {req['messages'][-1]!r}"[:3000]
        return reply
    return fn


def assert_no_failed_checks(fake):
    assert not fake.errors, "\n".join(fake.errors)


def png_ok(path, rows, tmp_dir):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 800 <= w <= 2000 and 400 <= h <= 1200
    assert_plot_marks(path, rows, tmp_dir)


@pytest.mark.sandbox
def test_research_loop_end_to_end(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    note = "- NOTE-XYZ: the text encoder must not be constant\n"

    def fresh(req):   # every experiment starts a fresh conversation: system + one user message
        assert len(req["messages"]) == 2 and req["messages"][0]["role"] == "system"
        assert "## Phase 1: Hyperparameters" in req["messages"][0]["content"]
        assert "Current phase: Phase 1: Hyperparameters" in req["messages"][1]["content"]
        return True

    def nudged(req):
        m = req["messages"][-1]
        return m["role"] == "user" and m["content"].startswith("You did not call a tool.")

    def results_row(req, pattern):   # the results table of the prompt
        return re.search(pattern, req["messages"][1]["content"], re.M) is not None

    def crash_fed_back(req):        # the crash's reason and the log tail, with the traceback, for a fix attempt
        m = req["messages"][-1]
        return (m["role"] == "user" and m["content"].startswith("The run crashed (")
                and "Last lines of logs/3.log" in m["content"] and "train| RuntimeError: boom-1" in m["content"])

    script = [
        # exp 1: nudge, two refused paths, an edit that improves (native tool calls)
        expect(fresh, text("I think we should restore the text encoder.")),
        expect(nudged, tool_call("read_file", path="../../etc/passwd")),
        expect(lambda r: last_tool_result(r) == "ERROR: '..' is not allowed: '../../etc/passwd'",
               tool_call("edit_file", path="prepare_data.py", old_text="import", new_text="x")),
        expect(lambda r: last_tool_result(r).startswith("ERROR: 'prepare_data.py' is not allowed here; allowed: "
                                                        "scratchpad.md, train.py"),
               tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK)),
        tool_call("edit_file", path="train.py", old_text=IMG_BAD, new_text=IMG_OK),
        expect(lambda r: last_tool_result(r).startswith("OK: edited train.py"),
               tool_call("run_experiment", description="restore text embeddings")),
        # exp 2: tool calls written in content (three styles), an edit that makes it worse, a scratchpad note;
        # the prompt shows exp 1's result
        expect(lambda r: fresh(r) and results_row(r, r"^1 +keep +[\d.]+ +-[\d.]+ +restore text embeddings$"),
               content_tool_call("edit_file", path="train.py", old_text=TXT_OK, new_text=TXT_BAD, style="fenced")),
        expect(lambda r: last_tool_result(r).startswith("OK: edited train.py"),
               content_tool_call("edit_file", path="scratchpad.md", old_text="## Next ideas\n",
                                 new_text="## Next ideas\n" + note, style="tag")),
        content_tool_call("run_experiment", description="constant text embeddings again", style="parameters"),
        # exp 3: a crash, then a fix that fails too (several calls in one reply); the prompt shows exp 2's
        # result and the note that survived its revert
        expect(lambda r: fresh(r) and "NOTE-XYZ" in r["messages"][1]["content"]
               and results_row(r, r"^2 +discard +[\d.]+ +[\d.]+ +constant text embeddings again$"),
               tool_calls(("edit_file", {"path": "train.py", "old_text": BOOM,
                                         "new_text": "    raise RuntimeError('boom-1')\n" + BOOM}),
                          ("run_experiment", {"description": "crash on purpose"}))),
        expect(crash_fed_back,
               tool_calls(("edit_file", {"path": "train.py", "old_text": "boom-1", "new_text": "boom-2"}),
                          ("run_experiment", {"description": "crash on purpose, fixed?"}))),
        # exp 4: run_experiment without a change is refused, then recorded invalid
        expect(lambda r: results_row(r, r"^3 +crash +- +- +crash on purpose$"),
               tool_call("run_experiment", description="nothing changed")),
        expect(lambda r: last_tool_result(r).startswith("ERROR: cannot run: train.py is identical"),
               tool_call("run_experiment", description="again")),
    ]
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        p = harness(repo, env_for(fake.url, data), "--tag", "e2e", "--max-experiments", "4", "--noise-runs", "2",
                    "--fix-attempts", "1", "--max-invalid", "1")
        assert_no_failed_checks(fake)
        assert p.returncode == 0, p.stdout + p.stderr
        assert fake.remaining == 0
        reqs = fake.chat_requests
        assert all(r["options"]["num_ctx"] == 16384 and len(r["tools"]) == 3 for r in reqs)

    rs = rows(repo)
    assert [r["status"] for r in rs] == ["baseline", "keep", "discard", "crash", "invalid"], rs
    base, keep, worse, crash, invalid = rs
    assert float(base["val_mean_rank"]) == N_VAL and base["runs"] == f"{N_VAL},{N_VAL}" and float(base["sigma"]) == 0
    assert float(keep["val_mean_rank"]) < N_VAL * 0.7 and float(keep["delta"]) < -float(keep["threshold"]) <= 0
    # the keep rule: one run screens it, the baseline (2 runs) is run once more, two more runs confirm it; once kept
    # it runs once more (the honest estimate); without noise (the baseline's runs all equal) any gain is real
    assert len(keep["runs"].split(",")) == 3 and keep["incumbent_runs"] == str(N_VAL) and keep["after_runs"]
    assert float(keep["honest"]) == float(keep["after_runs"]) and keep["t"] == "inf"
    assert float(worse["val_mean_rank"]) == (N_VAL + (N_VAL + 1) / 2) / 2      # image->text ~n/2, text->image n
    assert float(worse["delta"]) == pytest.approx(float(worse["val_mean_rank"]) - float(keep["best"]), abs=0.01)
    assert float(worse["delta"]) > 0 and "after 1 run(s)" in worse["reason"] and "not > 1.1" in worse["reason"]
    runs = [*map(float, keep["runs"].split(",")), float(keep["after_runs"])]   # the noise, pooled and relative:
    s = pooled_cv([[N_VAL] * 3, runs[1:]])                                     # the baseline's runs, the keep's
    assert s > 0 and float(worse["sigma"]) == pytest.approx(s * float(worse["best"]), rel=1e-6)
    assert "exit" in crash["reason"] and crash["commit"]
    assert invalid["commit"] == "" and "identical" in invalid["reason"]
    assert crash["description"] == "crash on purpose"
    assert keep["description"] == "restore text embeddings" and keep["phase"] == "Phase 1: Hyperparameters"
    secs = {r["status"]: {k: float(r[k]) for k in ("model_seconds", "run_seconds", "wall_seconds")} for r in rs}
    assert secs["baseline"]["model_seconds"] == 0 and secs["invalid"]["run_seconds"] == 0
    assert secs["baseline"]["run_seconds"] >= 2 * 2 and secs["keep"]["run_seconds"] >= 2 * 2   # 2 runs of 2 s
    assert secs["discard"]["run_seconds"] >= 2 and secs["crash"]["run_seconds"] > 0
    assert all(secs[s]["model_seconds"] > 0 for s in ("keep", "discard", "crash", "invalid"))
    assert all(v["wall_seconds"] >= v["model_seconds"] + v["run_seconds"] - 0.01 for v in secs.values())
    assert all(int(r["prompt_tokens"]) > 1000 for r in rs[1:])

    # git: the branch holds the keep (structured message) and the notes; train.py is the best version
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/e2e"
    assert git(repo, "status", "--porcelain") == ""
    msg = git(repo, "log", "-1", "--format=%B", keep["commit"])
    for part in ("exp 1: restore text embeddings", "Hypothesis: restore text embeddings", "Experiment: 1",
                 "Phase: Phase 1", "Status: keep", "Metric: val_mean_rank", "Delta: -"):
        assert part in msg, msg
    assert keep["commit"] == keep["best_commit"]
    src = (repo / "train.py").read_text()
    assert TXT_OK in src and IMG_OK in src and TXT_BAD not in src and "boom" not in src
    assert note in (repo / "scratchpad.md").read_text()              # the note survived the revert
    assert "NOTE-XYZ" in git(repo, "show", "HEAD:scratchpad.md")
    subjects = git(repo, "log", "--format=%s", "main..HEAD").split("\n")
    assert sum(s.startswith("exp ") for s in subjects) == 1            # only the keep is on the branch

    # files: logs per run, hand-offs of baseline and best only, the picture, the held-out test
    assert (repo / "logs" / "1.log").read_text().count("--- trusted evaluation ---") == 1
    assert "boom-2" in (repo / "logs" / "3.log").read_text()
    assert sorted(os.listdir(repo / "runs")) == ["0", "1"]
    png_ok(repo / "progress.png", rs, tmp_path)
    lines = p.stdout.split("\n")
    head = next(i for i, line in enumerate(lines) if "test_mean_rank" in line)
    assert lines[head + 1].split()[0] == "baseline" and lines[head + 2].startswith("best (exp 1)")
    assert float(lines[head + 1].split()[-1]) == 40.0                 # constant encoders: every rank = n_test
    assert float(lines[head + 2].split()[-1]) < 40.0
    assert "experiments/hour" in p.stdout and "waiting for the model" in p.stdout

    # report subcommand on the finished run
    (repo / "progress.png").unlink()
    r = harness(repo, env_for("http://127.0.0.1:9", data), "report", "--test")
    assert r.returncode == 0 and "kept (25%)" in r.stdout and "wrote progress.png" in r.stdout
    rl = r.stdout.split("\n")
    rhead = next(i for i, line in enumerate(rl) if "test_mean_rank" in line)
    assert rl[rhead + 1:rhead + 3] == lines[head + 1:head + 3]       # same val and test numbers as at the end
    png_ok(repo / "progress.png", rs, tmp_path)


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def training_started(log):
    return lambda: log.exists() and "train| " in log.read_text()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def containers_of(pid):
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    return [n for n in out.split() if n.startswith(f"autoresearch-{pid}-")]


@pytest.mark.sandbox
def test_ctrl_c_then_kill_9_then_resume(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    improve = [tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK),
               tool_call("run_experiment", description="restore text embeddings")]   # deterministic 36.25
    with FakeOllama({"qwen2.5-coder:7b": 32768}, improve) as fake:
        env = env_for(fake.url, data)
        args = [sys.executable, "autoresearch.py", "--max-experiments", "1", "--noise-runs", "2"]
        # 1) Ctrl-C (SIGINT to the harness) while experiment 1 trains
        p = subprocess.Popen(args + ["--tag", "intr"], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(training_started(repo / "logs" / "1.log"), 300, "experiment 1 to train")
        run_pid = int((repo / "runs" / ".running").read_text())
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, err
        assert "--resume" in err
        assert not alive(run_pid) and containers_of(run_pid) == []
        rs = rows(repo)
        assert [r["status"] for r in rs] == ["baseline", "interrupted"] and rs[1]["experiment"] == "1"
        assert TXT_BAD in (repo / "train.py").read_text() and git(repo, "status", "--porcelain") == ""

        # 2) resume (tag taken from the branch), then kill -9 while experiment 2 trains
        fake.add(*improve)
        p = subprocess.Popen(args + ["--resume"], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(training_started(repo / "logs" / "2.log"), 300, "experiment 2 to train")
        orphan = int((repo / "runs" / ".running").read_text())
        p.kill()
        p.communicate(timeout=30)
        assert alive(orphan)          # run.sh lives on in its own session: the next start must stop it

        # 3) resume again: stops the orphan, records experiment 2 as interrupted, runs experiment 3 (a change that
        #    changes nothing here: both encoders are constant) to its discard
        fake.add(tool_call("edit_file", path="train.py", old_text="WEIGHT_DECAY = 1e-4\n",
                           new_text="WEIGHT_DECAY = 2e-4\n"),
                 tool_call("run_experiment", description="more weight decay"))
        r = harness(repo, env, "--max-experiments", "1", "--noise-runs", "2", "--resume")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not alive(orphan) and containers_of(orphan) == []
        assert fake.remaining == 0
        # 4) a run that hangs: run.sh's wall clock (budget + AUTORESEARCH_GRACE) ends it, recorded as timeout
        fake.add(tool_call("edit_file", path="train.py", old_text=BOOM, new_text="    time.sleep(600)\n" + BOOM),
                 tool_call("run_experiment", description="hang"))
        r = harness(repo, dict(env, AUTORESEARCH_GRACE="3"), "--max-experiments", "2", "--resume")
        assert r.returncode == 0, r.stdout + r.stderr
        assert fake.remaining == 0
    rs = rows(repo)
    assert [(r["experiment"], r["status"]) for r in rs] == [("0", "baseline"), ("1", "interrupted"),
                                                           ("2", "interrupted"), ("3", "discard"), ("4", "timeout")], rs
    assert "TIMEOUT" in rs[4]["reason"] and "time.sleep(600)" not in (repo / "train.py").read_text()
    assert "killed" in rs[2]["reason"] and rs[2]["commit"]
    assert rs[3]["runs"] == str(N_VAL) and rs[3]["after_runs"] == "" and float(rs[3]["best"]) == N_VAL
    text = (repo / "train.py").read_text()
    assert TXT_BAD in text and "WEIGHT_DECAY = 1e-4\n" in text and git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "HEAD") == rs[0]["commit"]   # no notes commit: the scratchpad never changed


# ---------------------------------------------------------------- start-up checks: one clear message each

def startup(repo, env, *args):
    p = harness(repo, env, "--tag", "s", *args, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    return p.stderr


def test_startup_failures(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    models = [Model("qwen2.5-coder:7b"), Model("small:1b", 8192), Model("codellama:7b", capabilities=("completion",))]
    with FakeOllama(models) as fake:
        env = env_for(fake.url, data)
        assert "ollama pull nosuch:3b" in startup(repo, env, "--model", "nosuch:3b")
        err = startup(repo, env, "--model", "small:1b")
        assert "context of 8192" in err and "--num-ctx 8192" in err
        # a model without tool support is refused before the baseline, naming one that has it
        err = startup(repo, env, "--model", "codellama:7b")
        assert "'codellama:7b' does not support tool calling" in err and "--model qwen2.5-coder:7b" in err
        assert "run python prepare_data.py" in startup(repo, dict(env, AUTORESEARCH_DATA=str(tmp_path / "none")))
        bin_dir = tmp_path / "bin"          # PATH with git but without podman
        bin_dir.mkdir()
        os.symlink(shutil.which("git"), bin_dir / "git")
        assert "AUTORESEARCH_SANDBOX=none" in startup(repo, dict(env, PATH=str(bin_dir)))
        (repo / "train.py").write_text((repo / "train.py").read_text() + "# local change\n")
        assert "not clean" in startup(repo, env)
        git(repo, "checkout", "train.py")
        assert "nothing to resume" in startup(repo, env, "--resume")
        git(repo, "branch", "autoresearch/s")
        assert "already exists" in startup(repo, env)
        assert fake.chat_requests == []
    with server_down() as url:
        env = env_for(url, data)
        assert "install Ollama" in startup(repo, dict(env, PATH=str(bin_dir)))
        (bin_dir / "ollama").write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / "ollama").chmod(0o755)
        assert "`ollama serve`" in startup(repo, dict(env, PATH=f"{bin_dir}"))
    plain = tmp_path / "plain"
    plain.mkdir()
    copy_into(plain, ["autoresearch.py", "engine"])
    assert "not inside a git repository" in startup(plain, env)


# ---------------------------------------------------------------- the model's server failing, phases, parsers, --serve
# (no sandbox run: the baseline is recorded and the experiments end before a run)

def test_ollama_failing_mid_experiment_is_retried_then_recorded_interrupted_and_resumed(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    base = seed_baseline(repo, "fail")
    same = lambda r: r["messages"] == fake.chat_requests[0]["messages"]     # a retry resends the conversation

    def go_away(req):       # Ollama dies while answering: the request is cut, then the port refuses
        threading.Thread(target=fake.stop).start()
        return delay(60)

    script = [error(500, "llama runner process has terminated: exit status 2"),    # exp 1: a crashed runner,
              delay(20, text("too late")),                                         # a timeout (--request-timeout 3),
              expect(same, tool_call("run_experiment", description="unchanged")),  # then an answer
              go_away]                                                             # exp 2
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        p = harness(repo, env_for(fake.url, data), "--resume", "--max-experiments", "2", "--max-invalid", "0",
                    "--request-timeout", "3")
        assert_no_failed_checks(fake)
    assert p.returncode == 2, p.stdout + p.stderr
    retries = re.findall(r"^autoresearch: Ollama request failed \((\w+)", p.stdout, re.M)
    assert retries == ["ResponseError", "ReadTimeout", "RemoteProtocolError", "ConnectionError", "ConnectionError"]
    assert "Ollama request failed: ConnectionError" in p.stderr and "--resume --tag fail" in p.stderr
    rs = rows(repo)
    assert [(r["experiment"], r["status"]) for r in rs] == [("0", "baseline"), ("1", "invalid"), ("2", "interrupted")]
    assert "Ollama request failed" in rs[2]["reason"] and rs[2]["commit"] == ""
    assert git(repo, "rev-parse", "HEAD") == base and git(repo, "status", "--porcelain") == ""

    # --resume continues with a fresh conversation for the next experiment, which sees exp 1 but not exp 2
    with FakeOllama({"qwen2.5-coder:7b": 32768}, [
            expect(lambda r: re.search(r"^1 +invalid ", r["messages"][1]["content"], re.M) is not None
                   and re.search(r"^2 ", r["messages"][1]["content"], re.M) is None,
                   tool_call("run_experiment", description="unchanged again"))]) as fake:
        p = harness(repo, env_for(fake.url, data), "--resume", "--max-experiments", "2", "--max-invalid", "0")
        assert_no_failed_checks(fake)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [(r["experiment"], r["status"]) for r in rows(repo)][3:] == [("3", "invalid")]


def test_phase_advances_inside_the_loop(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    seed_baseline(repo, "phases")

    def phase_is(n, title):
        return lambda r: f"Current phase: Phase {n}: {title}\n" in r["messages"][1]["content"]

    unchanged = tool_call("run_experiment", description="unchanged")
    # --phase-plateau 1: one experiment without a keep ends a phase; then --phase-every 1: any experiment does
    with FakeOllama({"qwen2.5-coder:7b": 32768}, [expect(phase_is(1, "Hyperparameters"), unchanged),
                                                  expect(phase_is(2, "Losses and temperature"), unchanged)]) as fake:
        p = harness(repo, env_for(fake.url, data), "--resume", "--max-experiments", "2", "--max-invalid", "0",
                    "--phase-plateau", "1")
        assert_no_failed_checks(fake)
        assert p.returncode == 0, p.stdout + p.stderr
        fake.add(expect(phase_is(3, "Architecture"), unchanged))
        p = harness(repo, env_for(fake.url, data), "--resume", "--max-experiments", "3", "--max-invalid", "0",
                    "--phase-every", "1", "--phase-plateau", "99")
        assert_no_failed_checks(fake)
        assert p.returncode == 0, p.stdout + p.stderr
    assert [r["phase"] for r in rows(repo)] == ["Phase 1: Hyperparameters", "Phase 1: Hyperparameters",
                                                "Phase 2: Losses and temperature", "Phase 3: Architecture"]


@pytest.mark.parametrize("model", ["qwen2.5-coder:7b", "llama3.1:8b"])
def test_harness_takes_tool_calls_from_either_tool_parser(tmp_path, monkeypatch, model):
    """Ollama turns a model's tool calls into native tool_calls only when they are written the way its template
    writes them (<tool_call> tags for qwen, leading JSON for llama); the rest reaches the harness as text."""
    repo = make_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    script = [content_tool_call("read_file", path="program.md", style="fenced"),
              tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK),
              content_tool_call("edit_file", path="scratchpad.md", old_text="## Next ideas\n",
                                new_text="## Next ideas\n- N1\n", style="tag"),
              content_tool_call("run_experiment", description="restore text", style="bare")]
    args = types.SimpleNamespace(model=model, tag="p", num_ctx=16384, temperature=0.7, max_turns=6, max_nudges=0,
                                 max_tool_calls=10, max_invalid=0)
    with FakeOllama([model], script) as fake:
        agent = LLMAgent(args, make_client(fake.url, 30), project_metric(), (repo / "program.md").read_text())
        messages = [{"role": "system", "content": agent.system}, {"role": "user", "content": "go"}]
        assert agent.propose(messages, Outcome(1), ".", (repo / "train.py").read_text(), [], None) == (
            "run", "restore text")
        assert fake.remaining == 0
        sent = fake.chat_requests[-1]["messages"]
    native = {"qwen2.5-coder:7b": [False, True, True], "llama3.1:8b": [False, True, False]}[model]
    assert [bool(m.get("tool_calls")) for m in sent if m["role"] == "assistant"] == native
    results = [m["content"] for m in sent if m["role"] == "tool"]
    assert "## Phase 1: Hyperparameters" in results[0] and results[1].startswith("OK: edited train.py")
    assert results[2].startswith("OK: edited scratchpad.md")
    assert TXT_OK in (repo / "train.py").read_text() and "- N1\n" in (repo / "scratchpad.md").read_text()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_ollama_from_path(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    seed_baseline(repo, "serve")
    url = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "script.json").write_text(json.dumps([{"tool_calls": [["run_experiment", {"description": "x"}]]}]))
    bin_dir = tmp_path / "bin"       # a stand-in `ollama` that serves the scripted server on $OLLAMA_HOST
    bin_dir.mkdir()
    (bin_dir / "ollama").write_text(f"#!/bin/sh\n[ \"$1\" = serve ] || exit 2\necho \"$OLLAMA_HOST\" > {tmp_path}/host\n"
                                    f"echo $$ > {tmp_path}/pid\nexec {sys.executable} {HERE}/fake_ollama.py\n")
    (bin_dir / "ollama").chmod(0o755)
    env = dict(env_for(url, data), PATH=f"{bin_dir}:{os.environ['PATH']}",
               FAKE_OLLAMA_SCRIPT=str(tmp_path / "script.json"))
    del env["OLLAMA_HOST"]            # the server must be started on --host
    try:
        p = harness(repo, env, "--resume", "--serve", "--host", url, "--max-experiments", "1", "--max-invalid", "0")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "starting `ollama serve`" in p.stdout and (tmp_path / "host").read_text().strip() == url
        assert [r["status"] for r in rows(repo)] == ["baseline", "invalid"]
        assert "identical" in rows(repo)[1]["reason"]       # the scripted reply came from the server it started
    finally:
        if (tmp_path / "pid").exists():
            os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)


# ---------------------------------------------------------------- kill -9 in a keep's second seed; the harness's limits

@pytest.mark.sandbox
def test_kill_9_in_the_run_after_a_keep_keeps_it(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    seed_baseline(repo, "k9")
    improve = [tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK),
               tool_call("run_experiment", description="restore text embeddings")]   # deterministic 36.25
    with FakeOllama({"qwen2.5-coder:7b": 32768}, improve) as fake:
        env = env_for(fake.url, data)
        p = subprocess.Popen([sys.executable, "autoresearch.py", "--resume", "--max-experiments", "1",
                              "--noise-runs", "2"], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(training_started(repo / "logs" / "1-s4.log"), 600, "the run of experiment 1 after its keep")
        orphan = int((repo / "runs" / ".running").read_text())
        p.kill()
        p.communicate(timeout=30)
        # decided on its three runs, the keep is committed before the run after it
        assert "Status: keep\n" in git(repo, "log", "-1", "--format=%B") and TXT_OK in (repo / "train.py").read_text()
        r = harness(repo, env, "--resume", "--max-experiments", "1")
        assert r.returncode == 0, r.stdout + r.stderr
    assert not alive(orphan) and containers_of(orphan) == []
    rs = rows(repo)
    assert [(r["experiment"], r["status"]) for r in rs] == [("0", "baseline"), ("1", "keep")]
    assert rs[1]["runs"] == "36.25,36.25,36.25" and rs[1]["incumbent_runs"] == str(N_VAL) and float(rs[1]["best"]) \
        == 36.25 and "(3 run(s))" in rs[1]["reason"] and rs[1]["after_runs"] == ""
    assert git(repo, "rev-parse", "HEAD") == rs[1]["commit"] == rs[1]["best_commit"]
    assert TXT_OK in (repo / "train.py").read_text() and git(repo, "status", "--porcelain") == ""
    assert sorted(os.listdir(repo / "runs")) == ["1"]           # the cut-short run's hand-off is gone


@pytest.mark.sandbox
def test_harness_cuts_a_flooding_log_and_kills_a_run_past_its_wall_clock(tmp_path, data, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_into(repo, ("run.sh", "engine", "prepare_data.py"))
    monkeypatch.chdir(repo)
    for k, v in dict(AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_GRACE="600").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AUTORESEARCH_SANDBOX", raising=False)
    # 1) a train.py that prints 3 MiB: the log keeps its first 1 MiB (LOG_MAX_BYTES, lowered here) and the last
    #    256 KiB, and the metric block at the very end is still read
    monkeypatch.setattr(engine.runs, "LOG_MAX_BYTES", 1 << 20)
    (repo / "train.py").write_text(TINY_TRAINER + "for i in range(3 * 1024):\n    print('x' * 1023)\n"
                                   + TINY_TRAINER_MAIN)
    run = run_sandbox(types.SimpleNamespace(time_budget=2), "7", "runs/7", 1, "p", project_metric())
    assert run.status == "ok" and run.value > 1, run.tail
    log = (repo / "logs" / "7.log").read_bytes()
    head, note, tail = log.partition(b"\n[autoresearch: log cut at 1 MiB; its last 256 KiB follow]\n")
    assert note and len(head) == 1 << 20 and len(tail) == 256 << 10
    assert head.startswith(b"train| " + b"x" * 1023 + b"\n") and tail.count(b"--- trusted evaluation ---") == 1
    # 2) a train.py that hangs: the harness's own wall clock (run_limit, lowered here to budget + 8 s; run.sh's is
    #    600 s) stops run.sh, which removes its container
    monkeypatch.setattr(engine.runs, "run_limit", lambda budget, grace: budget + 8)
    (repo / "train.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n")
    pids = []
    watch = threading.Thread(target=lambda: wait_for(
        lambda: os.path.exists("runs/.running") and pids.append(int(open("runs/.running").read())) is None,
        60, "run.sh to start"))
    watch.start()
    t0 = time.time()
    run = run_sandbox(types.SimpleNamespace(time_budget=1), "8", "runs/8", 1, "p", project_metric())
    took = time.time() - t0
    watch.join()
    assert run.status == "timeout" and run.reason == f"harness wall-clock limit 9s exceeded; log: {run.log}", run.reason
    assert 9 <= took < 9 + 25 and "train| sleeping" in (repo / "logs" / "8.log").read_text()
    assert not alive(pids[0]) and containers_of(pids[0]) == [] and not os.path.exists("runs/.running")


# ---------------------------------------------------------------- hostile tool arguments (no sandbox run)

def test_no_tool_argument_crashes_the_loop_or_damages_a_file(tmp_path, data):
    """A lone surrogate (JSON "\\ud800") cannot be written as UTF-8: in edit_file's new_text, as a native tool call
    and as JSON in the content, and in run_experiment's description, each is a tool error to the model; train.py is
    never truncated, the experiment is recorded and the loop goes on. So is an edit that would put a NUL byte in
    train.py (it cannot parse) and one that would grow it past what fits in the context."""
    repo = make_repo(tmp_path / "repo")
    base = seed_baseline(repo, "tools")
    src = (repo / "train.py").read_text()
    line = "WEIGHT_DECAY = 1e-4\n"
    refused = lambda *words: lambda r: last_tool_result(r).startswith("ERROR") and all(  # noqa: E731
        w in last_tool_result(r) for w in words)
    script = [tool_call("edit_file", path="train.py", old_text=line, new_text="WEIGHT_DECAY = 2e-4  # \ud800\n"),
              expect(refused("new_text", "cannot be written as UTF-8"),
                     content_tool_call("edit_file", path="train.py", old_text=line, new_text="X = '\ud800'\n")),
              expect(refused("new_text", "UTF-8"),
                     tool_call("edit_file", path="train.py", old_text=line, new_text="WEIGHT_DECAY = 2e-4\n")),
              expect(lambda r: last_tool_result(r).startswith("OK"),
                     tool_call("run_experiment", description="weight decay x2 \ud800")),
              expect(refused("description", "UTF-8"),
                     tool_call("edit_file", path="train.py", old_text="WEIGHT_DECAY = 2e-4\n", new_text="A = 1\0\n")),
              expect(lambda r: "does not parse" in last_tool_result(r),
                     tool_call("run_experiment", description="nul byte")),
              expect(refused("cannot run", "does not parse"),
                     tool_call("edit_file", path="train.py", old_text="A = 1\0\n", new_text="#" * 40000 + "\n")),
              expect(refused("train.py would grow to", "more than its limit"),
                     text("I give up."))]
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        p = harness(repo, env_for(fake.url, data), "--resume", "--max-experiments", "1", "--max-nudges", "0",
                    "--max-invalid", "1")
        assert_no_failed_checks(fake)
        assert fake.remaining == 0, p.stdout + p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    assert [(r["experiment"], r["status"]) for r in rows(repo)] == [("0", "baseline"), ("1", "invalid")]
    assert (repo / "train.py").read_text() == src and git(repo, "rev-parse", "HEAD") == base   # intact, reverted
    assert git(repo, "status", "--porcelain") == ""
