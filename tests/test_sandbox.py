"""The sandbox, tested with real podman in host mode: hostile train.py files must be contained, reported,
and leave the host as it was.

Each test copies run.sh, engine/ and prepare_data.py into a temporary repository, writes its own train.py and
runs ./run.sh against a tiny real dataset made by prepare_data.py.
"""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_TRAINER, TINY_TRAINER_MAIN, copy_into

ROOT = Path(__file__).resolve().parents[1]

# A train.py that does no training but hands off a valid model, so the trusted evaluation can run.
EXPORT_MODEL = TINY_TRAINER + TINY_TRAINER_MAIN


def containers_of(run_sh_pid):
    """Containers run.sh started (it names them autoresearch-<its pid>-<random>), running or not."""
    out = subprocess.run(["podman", "ps", "-a", "--filter", "label=autoresearch=1", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True).stdout
    return [n for n in out.split() if n.startswith(f"autoresearch-{run_sh_pid}-")]


def host_processes_with(marker):
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [l for l in out.splitlines() if marker in l]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--out", str(d), "--n-train", "16",
                    "--n-val", "16", "--n-test", "16"], check=True, capture_output=True, cwd=d)
    return d


def make_repo(tmp_path, train_src):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_into(repo, ("run.sh", "engine", "prepare_data.py"))
    (repo / "train.py").write_text(train_src)
    return repo


def run(repo, data, *args, timeout=120, **env):
    e = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="20",
             AUTORESEARCH_GRACE="30", AUTORESEARCH_EVAL_TIMEOUT="60", AUTORESEARCH_MEMORY="2g")
    e.update(env)
    t = time.time()
    proc = subprocess.Popen(["./run.sh", *args], cwd=repo, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=timeout)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    p.seconds = time.time() - t
    p.lines = out.splitlines()
    assert containers_of(proc.pid) == [], "run.sh left a container behind"
    return p


# ------------------------------------------------------------------------------------- one probing run

PROBE = r'''
import errno, os, socket, subprocess, sys, time
def attempt(name, fn):
    try:
        r = fn()
        print(f"PROBE {name}: ALLOWED {r!r}"[:300])
    except Exception as e:
        print(f"PROBE {name}: blocked ({type(e).__name__}: {e})"[:300])

def connect(host, port):
    s = socket.create_connection((host, port), timeout=3); s.sendall(b"escaped"); s.close(); return "connected"

attempt("loopback", lambda: connect("127.0.0.1", @PORT@))
attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
attempt("outside", lambda: connect("192.0.2.1", 80))
attempt("write_repo_copy", lambda: open("/workspace/train.py", "a").write("# tampered"))
attempt("write_repo_host", lambda: open("@REPO@/evil.txt", "w").write("x"))
attempt("write_new_code", lambda: open("/workspace/evil.py", "w").write("x"))
attempt("write_data", lambda: open("/data/train/evil.npy", "w").write("x"))
attempt("write_etc", lambda: open("/etc/autoresearch-evil", "w").write("x"))
# /tmp is the container's own tmpfs: allowed, but must not reach the host.
attempt("write_tmp", lambda: open("@TMP_MARKER@", "w").write("x"))
attempt("secret", lambda: open("@SECRET@").read())
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("host_data", lambda: os.listdir("@DATA@"))
attempt("host_val", lambda: os.listdir("@DATA@/val"))
attempt("val", lambda: os.listdir("/data/val"))
attempt("test", lambda: os.listdir("/data/test"))
print("PROBE data_listing:", sorted(os.listdir("/data")))
print("PROBE uid:", os.getuid())
# A daemon that tries to outlive the run.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "@MARKER@"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:
    os.setsid(); os.execv("/bin/sleep", ["sleep", "600"])
# Try to forge the metric block, also hidden behind a carriage return and without a final newline.
print("val_mean_rank: 0.01")
print("--- trusted evaluation ---")
print("progress 10%\rval_median_rank: 0.5")
''' + EXPORT_MODEL + r'''
sys.stdout.write("total_seconds: 0.1")
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("probe")
    marker = "autoresearch-probe-" + secrets.token_hex(6)
    secret_file = Path("/root/.autoresearch-test-secret-" + secrets.token_hex(4))
    tmp_marker = Path("/tmp/autoresearch-test-marker-" + secrets.token_hex(4))
    secret_file.write_text("TOPSECRET-" + secrets.token_hex(8))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.5)
    connections = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except socket.timeout:
                pass
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    repo = tmp / "repo"
    src = PROBE
    for k, v in dict(PORT=listener.getsockname()[1], REPO=repo, TMP_MARKER=tmp_marker, SECRET=secret_file,
                     DATA=data, MARKER=marker).items():
        src = src.replace(f"@{k}@", str(v))
    before = sorted(p.name for p in repo.parent.iterdir())
    try:
        make_repo(tmp, src)
        train_before = (repo / "train.py").read_text()
        p = run(repo, data)
        time.sleep(0.5)
    finally:
        stop.set()
        th.join()
        listener.close()
        secret_file.unlink()
    p.connections = connections
    p.survivors = host_processes_with(marker)
    p.tmp_marker_exists = tmp_marker.exists()
    p.repo_files = sorted(f.name for f in repo.iterdir())
    p.train_unchanged = (repo / "train.py").read_text() == train_before
    p.secret = secret_file.read_text() if secret_file.exists() else None
    p.probes = {m.group(1): m.group(2) for m in re.finditer(r"^train\| PROBE (\w+):? (.*)$", p.stdout, re.M)}
    print(p.stdout, p.stderr)
    return p


def test_complete_run_exits_0_with_trusted_block(probe):
    assert probe.returncode == 0, probe.stdout + probe.stderr
    i = probe.lines.index("--- trusted evaluation ---")
    block = dict(l.split(": ", 1) for l in probe.lines[i + 1:])
    assert {"val_mean_rank", "val_median_rank", "val_r1", "val_r5", "val_r10", "val_n", "num_steps",
            "total_seconds"} <= set(block)
    assert block["val_n"] == "16" and block["num_steps"] == "3"
    assert 1 <= float(block["val_mean_rank"]) <= 16
    assert probe.lines[-1].startswith("total_seconds: ")


def test_train_output_is_prefixed_and_cannot_forge_metrics(probe):
    i = probe.lines.index("--- trusted evaluation ---")
    assert all(l.startswith("train| ") for l in probe.lines[:i]), probe.lines[:i]
    assert probe.lines.count("--- trusted evaluation ---") == 1
    assert "train| val_mean_rank: 0.01" in probe.lines
    assert "train| --- trusted evaluation ---" in probe.lines
    # the carriage return starts a new, still prefixed line; the unterminated last line stays on its own line
    assert "train| progress 10%" in probe.lines and "train| val_median_rank: 0.5" in probe.lines
    assert "train| total_seconds: 0.1" in probe.lines
    assert probe.lines.count("val_mean_rank: 0.01") == 0


def test_no_network(probe):
    for name in ("loopback", "dns", "outside"):
        assert probe.probes[name].startswith("blocked"), (name, probe.probes[name])
    assert probe.connections == [], "the container reached a listener on the host's loopback"


def test_code_data_and_host_are_read_only(probe):
    for name in ("write_repo_copy", "write_repo_host", "write_new_code", "write_data", "write_etc"):
        assert probe.probes[name].startswith("blocked"), (name, probe.probes[name])
    assert probe.train_unchanged
    assert probe.repo_files == ["engine", "prepare_data.py", "run.sh", "runs", "train.py"]
    assert not Path("/etc/autoresearch-evil").exists()
    # the container's /tmp is its own: writing there works but never reaches the host
    assert probe.probes["write_tmp"].startswith("ALLOWED")
    assert not probe.tmp_marker_exists


def test_secrets_and_held_out_data_are_invisible(probe):
    for name in ("secret", "shadow", "host_val", "val", "test"):
        assert probe.probes[name].startswith("blocked"), (name, probe.probes[name])
    assert probe.probes["host_data"] in ("ALLOWED []", ) or probe.probes["host_data"].startswith("blocked")
    assert probe.probes["data_listing"] == "['meta.json', 'train']"
    assert probe.probes["uid"] == "65534"   # non-root inside the sandbox


def test_no_process_outlives_the_run(probe):
    assert probe.survivors == []
    assert not host_processes_with("sleep 600")


# ------------------------------------------------------------------------------------- limits

def test_fork_bomb_is_stopped_by_the_pids_limit(tmp_path, data):
    marker = "autoresearch-fork-" + secrets.token_hex(6)
    repo = make_repo(tmp_path, f'''
import os, sys, time
n = 0
while True:
    try:
        pid = os.fork()
    except OSError as e:
        print(f"fork failed after {{n}} children: {{e}}", flush=True)
        break
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", "{marker}"])
    n += 1
sys.exit(3)
''')
    p = run(repo, data, AUTORESEARCH_PIDS="64")
    assert "Resource temporarily unavailable" in p.stdout, p.stdout
    n = int(re.search(r"fork failed after (\d+) children", p.stdout).group(1))
    assert 10 < n < 64
    assert p.returncode == 1 and p.lines[-1] == "run.sh: FAILED train.py exited with code 3"
    assert host_processes_with(marker) == []


def test_memory_hog_is_killed_with_a_clear_message(tmp_path, data):
    repo = make_repo(tmp_path, '''
chunks = []
print("allocating", flush=True)
while True:
    chunks.append(bytearray(32 * 2**20))
    chunks[-1][::4096] = b"x" * len(chunks[-1][::4096])
''')
    p = run(repo, data, AUTORESEARCH_MEMORY="256m")
    assert p.returncode == 137, p.stdout + p.stderr
    assert p.lines[-1].startswith("run.sh: OUT OF MEMORY") and "AUTORESEARCH_MEMORY=256m" in p.lines[-1]


def test_endless_loop_is_killed_at_the_time_limit(tmp_path, data):
    marker = "autoresearch-loop-" + secrets.token_hex(6)
    repo = make_repo(tmp_path, f'''
import signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # only SIGKILL can stop this
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{marker}"], start_new_session=True)
print("spinning", flush=True)
while True:
    pass
''')
    p = run(repo, data, AUTORESEARCH_TIME_BUDGET="2", AUTORESEARCH_GRACE="3")
    assert p.returncode == 124, p.stdout + p.stderr
    assert p.lines[-1].startswith("run.sh: TIMEOUT") and "AUTORESEARCH_TIME_BUDGET=2" in p.lines[-1]
    assert "train| spinning" in p.lines
    assert 5 <= p.seconds < 20
    assert host_processes_with(marker) == []


def test_evaluation_has_its_own_time_limit(tmp_path, data):
    # An evaluation that never ends (here the project's score()) is stopped by AUTORESEARCH_EVAL_TIMEOUT.
    repo = make_repo(tmp_path, EXPORT_MODEL)
    with open(repo / "prepare_data.py", "a") as f:
        f.write("\n\ndef score(encode, split):\n    import time\n    while True:\n        time.sleep(1)\n")
    p = run(repo, data, AUTORESEARCH_EVAL_TIMEOUT="3")
    assert p.returncode == 124, p.stdout + p.stderr
    assert p.lines[-1].startswith("run.sh: TIMEOUT evaluation")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_run_sh_kills_and_removes_the_container(tmp_path, data, sig, code):
    marker = "autoresearch-sig-" + secrets.token_hex(6)
    repo = make_repo(tmp_path, f'''
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{marker}"], start_new_session=True)
print("ready", flush=True)
while True:
    time.sleep(1)
''')
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data))
    # Like the harness: run.sh leads its own process group, which gets the signal.
    # SIGINT back to default: a shell's background job (CI runners) inherits it ignored, and bash cannot trap an
    # ignored signal; the harness itself always starts run.sh with the default.
    p = subprocess.Popen(["./run.sh"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in p.stdout:          # streams: "ready" arrives while training still runs
        lines.append(line.rstrip("\n"))
        if line == "train| ready\n":
            break
    t = time.time()
    os.killpg(p.pid, sig)
    lines += p.stdout.read().splitlines()   # EOF only once nothing holds the output open any more
    assert p.wait(timeout=30) == code
    assert time.time() - t < 10
    assert lines[-1].startswith("run.sh: INTERRUPTED")
    assert containers_of(p.pid) == []
    assert (repo / "runs" / "last").stat().st_uid == os.getuid()   # the hand-off dir was given back
    assert host_processes_with(marker) == []


def test_wait_starts_early_and_runs_the_train_py_of_its_go_timed_from_there(tmp_path, data):
    """./run.sh --wait, as the loop starts a candidate's run while the model still writes it: both containers are up
    before go, the train.py that runs is the one committed at go, and the time limit counts from go."""
    repo = make_repo(tmp_path, "raise SystemExit('the train.py from before go ran')\n")
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="1",
               AUTORESEARCH_GRACE="14", AUTORESEARCH_EVAL_TIMEOUT="60", AUTORESEARCH_MEMORY="2g")
    p = subprocess.Popen(["./run.sh", "--wait"], cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "run.sh: ready\n"
    time.sleep(16)   # longer than the training limit (budget 1 + grace 14)
    assert len(containers_of(p.pid)) == 2
    (repo / "train.py").write_text("print('the edit')\n" + EXPORT_MODEL)
    out, err = p.communicate("go\n", timeout=120)
    assert p.returncode == 0, out + err
    lines = out.splitlines()
    assert "train| the edit" in lines and "val_n: 16" in lines
    wall = float(next(line for line in lines if line.startswith("train_wall_seconds: ")).split()[1])
    total = float(lines[-1].removeprefix("total_seconds: "))
    assert wall < 15 and total < 16, (wall, total)   # neither counts the wait
    assert containers_of(p.pid) == []

    # no go: the run is cancelled and leaves nothing behind
    p = subprocess.Popen(["./run.sh", "--wait"], cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "run.sh: ready\n"
    out, err = p.communicate("", timeout=60)
    assert p.returncode == 130 and out.splitlines()[-1].startswith("run.sh: CANCELLED"), out + err
    assert "train| " not in out and containers_of(p.pid) == []


def test_crashing_train_py_fails_without_evaluation(tmp_path, data):
    repo = make_repo(tmp_path, "raise SystemExit('boom')\n")
    p = run(repo, data)
    assert p.returncode == 1
    assert "train| boom" in p.lines and "--- trusted evaluation ---" not in p.lines
    assert p.lines[-1] == "run.sh: FAILED train.py exited with code 1"


def test_missing_model_is_a_failure_of_train_py(tmp_path, data):
    repo = make_repo(tmp_path, "print('did nothing')\n")
    run_dir = repo / "runs" / "last"
    run_dir.mkdir(parents=True)
    (run_dir / "image_encoder.pt2").write_text("stale model from an earlier run")
    (run_dir / "notes.txt").write_text("keep me")
    p = run(repo, data)
    assert p.returncode == 1 and p.lines[-1].startswith("run.sh: FAILED train.py handed off no image_encoder.pt2 "), \
        p.stdout + p.stderr
    assert "--- trusted evaluation ---" not in p.lines
    # stale hand-off files are removed before training, other files are left alone
    assert sorted(f.name for f in run_dir.iterdir()) == ["notes.txt"]


def test_test_split_is_only_mounted_for_test_mode(tmp_path, data):
    repo = make_repo(tmp_path, EXPORT_MODEL)
    first = run(repo, data)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "val_n: 16" in first.lines
    p = run(repo, data, "--test", "runs/last")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.lines
    assert lines[0] == "--- trusted evaluation ---" and "test_n: 16" in lines and "val_n: 16" not in lines
    assert lines[-1].startswith("total_seconds: ")
    # hand-off files come back owned by the user that ran run.sh
    assert {f.stat().st_uid for f in (repo / "runs" / "last").iterdir()} == {os.getuid()}


# ------------------------------------------------------------------------------------- modes and set-up

def test_no_sandbox_mode_runs_directly_with_a_loud_warning(tmp_path, data):
    repo = make_repo(tmp_path, "import os\nprint('uid', os.getuid())\n" + EXPORT_MODEL)
    p = run(repo, data, AUTORESEARCH_SANDBOX="none")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "WITHOUT a sandbox" in p.stderr
    assert f"train| uid {os.getuid()}" in p.lines and "val_n: 16" in p.lines


def test_refuses_without_podman(tmp_path, data):
    repo = make_repo(tmp_path, EXPORT_MODEL)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "mkdir", "cat", "cut", "date", "id", "mktemp", "numfmt", "rm"):
        os.symlink(shutil.which(tool), bindir / tool)
    os.symlink(sys.executable, bindir / "python3")   # run.sh's engine (a pyenv shim would need the whole PATH)
    p = run(repo, data, PATH=str(bindir))
    assert p.returncode == 2
    assert "podman is not installed" in p.stderr and "AUTORESEARCH_SANDBOX=none" in p.stderr


@pytest.mark.parametrize("missing, kind", [(None, None), ("meta.json", None), ("train", None), ("val/tokens.npy", None),
                                           ("meta.json", "dir"), ("train", "file")])
def test_missing_data_is_a_setup_error(tmp_path, data, missing, kind):
    repo = make_repo(tmp_path, "print('PROBE started: yes', flush=True)\n" + EXPORT_MODEL)
    cache = tmp_path / "nodata"
    if missing:   # a cache with one of the files training or the evaluation needs removed, or of the wrong kind
        shutil.copytree(data, cache)
        (shutil.rmtree if (cache / missing).is_dir() else os.remove)(cache / missing)
        if kind:
            (cache / missing).mkdir() if kind == "dir" else (cache / missing).write_text("")
    p = run(repo, cache)
    assert p.returncode == 2 and "Run: python prepare_data.py" in p.stderr, p.stdout + p.stderr
    assert (f"(no {missing} there)" if missing else "no data cache at") in p.stderr, p.stderr
    assert "PROBE started" not in p.stdout


def test_a_broken_project_is_a_setup_error_not_a_crash_of_train_py(tmp_path, data):
    repo = make_repo(tmp_path, EXPORT_MODEL)
    project = (repo / "prepare_data.py").read_text()
    # a declaration the engine cannot read: refused before training starts
    (repo / "prepare_data.py").write_text(project.replace("PROGRAMS = [", 'PROGRAMS = ["two words.pt2", '))
    p = run(repo, data)
    assert p.returncode == 2 and "write PROGRAMS once, as a literal" in p.stderr and "train| " not in p.stdout, \
        p.stdout + p.stderr
    # a score() that breaks its contract: the evaluator's reason, and exit 2 (the loop stops instead of blaming the model)
    (repo / "prepare_data.py").write_text(project + "\n\ndef score(encode, split):\n    return {'r1': 1.0}\n")
    p = run(repo, data)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "run.sh: the evaluator could not run: score() must return a dict {name: number} that holds METRIC " \
           "'mean_rank'" in p.stderr


def test_image_mode_build_failure_suggests_host_mode(tmp_path, data):
    repo = make_repo(tmp_path, EXPORT_MODEL)
    # An unreachable base image: the build fails the way it does on a machine without registry access.
    shutil.copy2(ROOT / "requirements.txt", repo / "requirements.txt")
    (repo / "Containerfile").write_text("FROM localhost/autoresearch-no-such-base:never\n")
    p = run(repo, data, AUTORESEARCH_IMAGE="")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "AUTORESEARCH_IMAGE=host" in p.stderr


def test_build_only_needs_no_data_and_reports_the_build(tmp_path):
    repo = make_repo(tmp_path, EXPORT_MODEL)
    shutil.copy2(ROOT / "requirements.txt", repo / "requirements.txt")
    (repo / "Containerfile").write_text("FROM localhost/autoresearch-no-such-base:never\n")
    p = run(repo, tmp_path / "nodata", "--build", AUTORESEARCH_IMAGE="")
    assert p.returncode == 2 and "could not build the image" in p.stderr   # a real build attempt, not a data error
    p = run(repo, tmp_path / "nodata", "--build")                           # host mode: nothing to build
    assert p.returncode == 0 and "ready" in p.stdout, p.stdout + p.stderr


def test_containerfile_installs_exactly_the_requirements():
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^FROM \S+", text, re.M)
    assert re.search(r"^COPY requirements\.txt ", text, re.M)
    installs = re.findall(r"pip install[^\n&]*", text)
    assert installs == ["pip install -r /tmp/requirements.txt "], \
        "every package must come from requirements.txt"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0", "0:0")
    assert re.search(r"^WORKDIR /workspace", text, re.M)
    # run.sh runs the image as the Containerfile's user
    assert f'IMAGE_USER = "{user[-1]}"' in (ROOT / "engine" / "sandbox.py").read_text()
