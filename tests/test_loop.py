"""End to end: autoresearch.py driven by the scripted Ollama server (tests/fake_ollama.py, through the real ollama
client), real git in a temp repo, the real run.sh (AUTORESEARCH_IMAGE=host) and real training on tiny data.

To make keep/discard deterministic with a 2-second budget, the temp repo's train.py is sabotaged: both encoders
return a constant, so every rank ties at n (val_mean_rank == n_val exactly). "Improving" restores the text
encoder (image->text ranks become ~n/2), "worsening" sabotages it again.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from fake_ollama import FakeOllama, content_tool_call, server_down, text, tool_call, tool_calls  # noqa: E402

N_VAL = 48
IMG_OK = "        return self.proj(self.vit(self.prep(images)))\n"
TXT_OK = "        return self.proj(pooled)\n"
IMG_BAD = "        return self.proj(self.vit(self.prep(images))) * 0 + 1\n"
TXT_BAD = "        return self.proj(pooled) * 0 + 1\n"
BOOM = "    torch.manual_seed(SEED)\n"
FILES = ["autoresearch.py", "train.py", "run.sh", "prepare_data.py", "program.md", "scratchpad.md", ".gitignore"]


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", str(d), "--n-train", "128",
                    "--n-val", str(N_VAL), "--n-test", "40"], check=True, capture_output=True)
    return d


def make_repo(path):
    path.mkdir()
    for f in FILES:
        shutil.copy2(os.path.join(ROOT, f), path / f)
    src = (path / "train.py").read_text()
    assert src.count(IMG_OK) == 1 and src.count(TXT_OK) == 1 and src.count(BOOM) == 1
    (path / "train.py").write_text(src.replace(IMG_OK, IMG_BAD).replace(TXT_OK, TXT_BAD))
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "template")
    return path


def env_for(url, data):
    env = dict(os.environ, OLLAMA_HOST=url, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data),
               AUTORESEARCH_TIME_BUDGET="2", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", PYTHONUNBUFFERED="1")
    env.pop("AUTORESEARCH_SANDBOX", None)
    return env


def harness(repo, env, *args, timeout=600):
    p = subprocess.run([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p


def rows(repo):
    sys.path.insert(0, ROOT)
    import autoresearch as ar
    return ar.load_results(str(repo / "results.tsv"))


def last_tool_result(req):
    m = req["messages"][-1]
    assert m["role"] == "tool", m
    return m["content"]


def expect(check, reply):
    """A scripted reply that first asserts something about the request (what the harness sent back)."""
    def fn(req):
        check(req)
        return reply
    return fn


def png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 800 <= w <= 2000 and 400 <= h <= 1200


def test_research_loop_end_to_end(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    note = "- NOTE-XYZ: the text encoder must not be constant\n"

    def fresh(req):   # every experiment starts a fresh conversation: system + one user message
        assert len(req["messages"]) == 2 and req["messages"][0]["role"] == "system"
        assert "## Phase 1: Hyperparameters" in req["messages"][0]["content"]
        assert "Current phase: Phase 1: Hyperparameters" in req["messages"][1]["content"]

    script = [
        # exp 1: nudge, two refused paths, an edit that improves (native tool calls)
        expect(fresh, text("I think we should restore the text encoder.")),
        expect(lambda r: "did not call a tool" in r["messages"][-1]["content"],
               tool_call("read_file", path="../../etc/passwd")),
        expect(lambda r: "'..' is not allowed" in last_tool_result(r),
               tool_call("edit_file", path="prepare_data.py", old_text="import", new_text="x")),
        expect(lambda r: "not allowed here" in last_tool_result(r),
               tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK)),
        tool_call("edit_file", path="train.py", old_text=IMG_BAD, new_text=IMG_OK),
        expect(lambda r: last_tool_result(r).startswith("OK: edited train.py"),
               tool_call("run_experiment", description="restore text embeddings")),
        # exp 2: tool calls written in content (three styles), an edit that makes it worse, a scratchpad note
        expect(lambda r: fresh(r) or "restore text embeddings" in r["messages"][1]["content"],
               content_tool_call("edit_file", path="train.py", old_text=TXT_OK, new_text=TXT_BAD, style="fenced")),
        expect(lambda r: last_tool_result(r).startswith("OK"),
               content_tool_call("edit_file", path="scratchpad.md", old_text="## Next ideas\n",
                                 new_text="## Next ideas\n" + note, style="tag")),
        content_tool_call("run_experiment", description="constant text embeddings again", style="parameters"),
        # exp 3: a crash, then a fix that fails too (several calls in one reply)
        expect(lambda r: fresh(r) or "NOTE-XYZ" in r["messages"][1]["content"],
               tool_calls(("edit_file", {"path": "train.py", "old_text": BOOM,
                                         "new_text": "    raise RuntimeError('boom-1')\n" + BOOM}),
                          ("run_experiment", {"description": "crash on purpose"}))),
        expect(lambda r: "boom-1" in r["messages"][-1]["content"] and r["messages"][-1]["role"] == "user",
               tool_calls(("edit_file", {"path": "train.py", "old_text": "boom-1", "new_text": "boom-2"}),
                          ("run_experiment", {"description": "crash on purpose, fixed?"}))),
        # exp 4: run_experiment without a change is refused, then recorded invalid
        tool_call("run_experiment", description="nothing changed"),
        expect(lambda r: "identical" in last_tool_result(r), tool_call("run_experiment", description="again")),
    ]
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        p = harness(repo, env_for(fake.url, data), "--tag", "e2e", "--max-experiments", "4", "--noise-runs", "2",
                    "--fix-attempts", "1", "--max-invalid", "1")
        assert p.returncode == 0, p.stdout + p.stderr
        assert fake.remaining == 0
        reqs = fake.chat_requests
        assert all(r["options"]["num_ctx"] == 16384 and len(r["tools"]) == 3 for r in reqs)

    rs = rows(repo)
    assert [r["status"] for r in rs] == ["baseline", "keep", "discard", "crash", "invalid"], rs
    base, keep, worse, crash, invalid = rs
    assert float(base["val_mean_rank"]) == N_VAL and base["runs"] == f"{N_VAL},{N_VAL}" and float(base["sigma"]) == 0
    assert float(keep["val_mean_rank"]) < N_VAL * 0.7 and float(keep["delta"]) < -float(keep["threshold"]) < 0
    assert len(keep["runs"].split(",")) == 2                  # a keep is repeated with another seed (sigma, best)
    assert float(worse["val_mean_rank"]) == (N_VAL + (N_VAL + 1) / 2) / 2      # image->text ~n/2, text->image n
    assert float(worse["delta"]) > 0 and "not > threshold" in worse["reason"]
    assert worse["sigma"] != "" and float(worse["sigma"]) > 0   # re-estimated from the keep's two seeds
    assert "exit" in crash["reason"] and crash["commit"]
    assert invalid["commit"] == "" and "identical" in invalid["reason"]
    assert crash["description"] == "crash on purpose"
    assert keep["description"] == "restore text embeddings" and keep["phase"] == "Phase 1: Hyperparameters"
    assert all(float(r["model_seconds"]) >= 0 and float(r["run_seconds"]) >= 0 for r in rs)

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
    png_ok(repo / "progress.png")
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
    png_ok(repo / "progress.png")


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


def test_ctrl_c_then_kill_9_then_resume(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    improve = [tool_call("edit_file", path="train.py", old_text=TXT_BAD, new_text=TXT_OK),
               tool_call("run_experiment", description="restore text embeddings")]   # deterministic 36.25
    with FakeOllama({"qwen2.5-coder:7b": 32768}, improve) as fake:
        env = env_for(fake.url, data)
        args = [sys.executable, "autoresearch.py", "--max-experiments", "1", "--noise-runs", "1"]
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

        # 3) resume again: stops the orphan, records experiment 2 as interrupted, runs experiment 3 in --confirm
        #    mode (kept only once a second seed agrees)
        fake.add(*improve)
        r = harness(repo, env, "--max-experiments", "1", "--noise-runs", "1", "--resume", "--confirm")
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
                                                           ("2", "interrupted"), ("3", "keep"), ("4", "timeout")], rs
    assert "TIMEOUT" in rs[4]["reason"] and "time.sleep(600)" not in (repo / "train.py").read_text()
    rs = rs[:4]
    assert "killed" in rs[2]["reason"] and rs[2]["commit"]
    assert rs[3]["runs"] == "36.25,36.25" and "n 2" in rs[3]["reason"] and float(rs[3]["best"]) == 36.25
    assert (repo / "logs" / "3-s2.log").exists()
    assert TXT_OK in (repo / "train.py").read_text() and git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "HEAD") == rs[3]["commit"]   # no notes commit: the scratchpad never changed


# ---------------------------------------------------------------- start-up checks: one clear message each

def startup(repo, env, *args):
    p = harness(repo, env, "--tag", "s", *args, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    return p.stderr


def test_startup_failures(tmp_path, data):
    repo = make_repo(tmp_path / "repo")
    with FakeOllama({"qwen2.5-coder:7b": 32768, "small:1b": 8192}) as fake:
        env = env_for(fake.url, data)
        assert "ollama pull nosuch:3b" in startup(repo, env, "--model", "nosuch:3b")
        err = startup(repo, env, "--model", "small:1b")
        assert "context of 8192" in err and "--num-ctx 8192" in err
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
    shutil.copy2(os.path.join(ROOT, "autoresearch.py"), plain)
    assert "not inside a git repository" in startup(plain, env)
