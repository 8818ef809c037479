"""Hostile train.py files against the harness's limits, with real podman in host mode (issue 8 §2-§5, issue 12 §7).

Each test first proves that its attack ran (the probe line is in the output), then asserts the specific outcome.
The budget rule and the exit-code rule are pure functions, tested here directly as well.
"""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_TRAINER, copy_into, git
from test_sandbox import EXPORT_MODEL, containers_of, data, host_processes_with, make_repo, run  # noqa: F401  (data: a fixture)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.judge import budget_allowance, classify_run, parse_metrics
from engine.results import load_results
from engine.project import Metric  # noqa: E402

MR = Metric("mean_rank", "minimize")   # the template's metric

sys.path.insert(0, str(ROOT / "tests"))
from fake_ollama import FakeOllama, tool_call  # noqa: E402


def probes(p):
    return {m.group(1): m.group(2) for m in re.finditer(r"^train\| PROBE (\w+): (.*)$", p.stdout, re.M)}


# ------------------------------------------------------------------------------- §2 the time budget is the harness's

def test_classify_run_refuses_over_budget_and_flags_setup_errors():
    out = "train| x\n--- trusted evaluation ---\nval_mean_rank: 3.5\ntrain_wall_seconds: {}\ntotal_seconds: 9.0\n"
    ok = out.format(330.0)
    assert classify_run(0, ok, parse_metrics(ok), MR, 300, 30.0) == ("ok", "")
    over = out.format(330.2)
    status, reason = classify_run(0, over, parse_metrics(over), MR, 300, 30.0)
    assert status == "invalid" and "took 330s" in reason and "300s budget + 30s" in reason
    assert classify_run(0, over, parse_metrics(over), MR)[0] == "ok"   # the baseline: nothing to compare with
    bare = "--- trusted evaluation ---\nval_mean_rank: 3.5\n"          # a run.sh that did not time training
    assert classify_run(0, bare, parse_metrics(bare), MR, 300, 30.0)[0] == "invalid"
    setup = "train| Error: no such runtime\nrun.sh: podman could not start the container (podman exit 125)\n  (check)\n"
    assert classify_run(2, setup, {}, MR) == ("setup", "run.sh: podman could not start the container (podman exit "
                                                      "125) (check)")


TIMED_TRAINER = TINY_TRAINER + r'''
import time
TIME_BUDGET = float(os.environ["AUTORESEARCH_TIME_BUDGET"])
img, txt = Img(), Txt()
opt = torch.optim.SGD(list(img.parameters()) + list(txt.parameters()), lr=1e-3)
t0, steps = time.time(), 0
while time.time() - t0 < TIME_BUDGET:
    loss = img(torch.rand(8, 3, S, S)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step(); steps += 1
print(f"PROBE trained: {time.time() - t0:.1f}s", flush=True)
export(img, txt)
stats()
'''


def test_train_py_that_raises_its_own_budget_is_invalid(tmp_path, data):
    greedy_src = TIMED_TRAINER.replace('TIME_BUDGET = float(os.environ["AUTORESEARCH_TIME_BUDGET"])',
                                       'TIME_BUDGET = float(os.environ["AUTORESEARCH_TIME_BUDGET"]) * 25')
    assert greedy_src != TIMED_TRAINER
    repos = {}
    for name, src in (("honest", TIMED_TRAINER), ("greedy", greedy_src)):
        (tmp_path / name).mkdir()
        repos[name] = make_repo(tmp_path / name, src)
    # side by side, to save time; a grace long enough to finish, so that the budget rule (not run.sh's kill) refuses
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(run, repo, data, AUTORESEARCH_TIME_BUDGET="2", AUTORESEARCH_GRACE="150",
                                  timeout=300) for name, repo in repos.items()}
    seen = {}
    for name, future in runs.items():
        p = future.result()
        assert p.returncode == 0, p.stdout + p.stderr
        seen[name] = parse_metrics(p.stdout)
        assert float(probes(p)["trained"].rstrip("s")) >= (2 if name == "honest" else 50)   # the attack ran
        assert seen[name]["train_wall_seconds"] > float(probes(p)["trained"].rstrip("s"))
    honest, greedy = runs["honest"].result(), runs["greedy"].result()
    allowance = budget_allowance(2)
    assert classify_run(0, honest.stdout, seen["honest"], MR, 2, allowance) == ("ok", "")
    status, reason = classify_run(0, greedy.stdout, seen["greedy"], MR, 2, allowance)
    assert status == "invalid" and "over the time budget" in reason, (reason, seen)


# ------------------------------------------------------------------------------- §4 disk, inodes, memory, terminal

HOSTILE = r'''
import errno, hashlib, os, resource, stat, subprocess, sys, threading, time
def probe(name, fn):
    try:
        r = fn()
        print(f"PROBE {name}: ALLOWED {r!r}"[:300], flush=True)
    except Exception as e:
        print(f"PROBE {name}: blocked {type(e).__name__}: {e}"[:300], flush=True)

def fill():                                      # real blocks, 1 MiB at a time, in files of 16 MiB
    n = 0
    try:
        while n < 300:
            with open(f"/out/fill{n // 16}", "ab") as f:
                f.write(b"x" * (1 << 20))
            n += 1
    finally:
        print(f"PROBE fill_mib: {n}", flush=True)
        for i in range(n // 16 + 1):
            os.remove(f"/out/fill{i}")
    return n

def sparse():
    with open("/out/sparse", "wb") as f:
        f.seek(1 << 40); f.write(b"x")

def inodes():                                    # empty files until the file system says no
    n = 0
    try:
        while n < 50000:
            open(f"/out/e{n}", "w").close(); n += 1
    finally:
        print(f"PROBE inode_count: {n}", flush=True)
        for i in range(n):
            os.remove(f"/out/e{i}")
    return n

def threads():
    ts, stop = [], threading.Event()
    try:
        while len(ts) < 5000:
            t = threading.Thread(target=stop.wait, daemon=True); t.start(); ts.append(t)
    finally:
        print(f"PROBE thread_count: {len(ts)}", flush=True)
        stop.set()
        for t in ts:
            t.join()

def exec_from_handoff():
    with open("/out/tool.sh", "w") as f:
        f.write("#!/bin/sh\necho ran\n")
    os.chmod("/out/tool.sh", 0o755)
    try:
        return subprocess.run(["/out/tool.sh"], capture_output=True, text=True).stdout
    finally:
        os.remove("/out/tool.sh")

probe("fill", fill)
probe("sparse", sparse)
probe("inodes", inodes)
probe("raise_core", lambda: resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2))
print(f"PROBE core_limit: {resource.getrlimit(resource.RLIMIT_CORE)}", flush=True)
print(f"PROBE fsize_limit: {resource.getrlimit(resource.RLIMIT_FSIZE)}", flush=True)
probe("threads", threads)
probe("exec_handoff", exec_from_handoff)
# Terminal tricks: erase the line and go to column 1 (CSI, also as C1), backspaces, a window-title OSC.
print("\x1b[2K\x1b[1GFAKE1 val_mean_rank: 0.5")
print("\u009b2K\u009b1GFAKE2 val_mean_rank: 0.5")
print("\b" * 7 + "FAKE3 val_mean_rank: 0.5\x1b]0;owned\x07")
# An endless line: megabytes without a newline.
chunk = "x" * (1 << 16)
for _ in range(@ENDLESS_MIB@ * 16):
    sys.stdout.write(chunk)
sys.stdout.write("\nPROBE endless: done\n"); sys.stdout.flush()
''' + EXPORT_MODEL + r'''
stats()
print("PROBE image_sha: " + hashlib.sha256(open("/out/image_encoder.pt2", "rb").read()).hexdigest(), flush=True)
# Leave things behind: a symlink, a FIFO, a hard link, odd modes, and a writer that outlives train.py.
os.symlink("/etc/passwd", "/out/passwd.pt2")
os.mkfifo("/out/pipe")
os.link("/out/image_encoder.pt2", "/out/hard.pt2")
os.chmod("/out/train_stats.json", 0o4777)
os.chmod("/out", 0o777)
subprocess.Popen([sys.executable, "-c", """
import os, time
print("PROBE late_writer: started", flush=True)
time.sleep(5)
open("/out/image_encoder.pt2", "wb").write(b"late junk")
print("PROBE late_writer: wrote", flush=True)
""", "@MARKER@"], start_new_session=True)
time.sleep(1)
print("PROBE done: exiting", flush=True)
os._exit(0)   # at once: the writer is still asleep
'''


def rss_of_shells(session):
    """Total resident KiB of run.sh's own processes in its session: run.sh itself (engine/sandbox.py, whose threads
    filter the output) and any bash process."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if (stat[stat.index("(") + 1:stat.rindex(")")] == "bash" or int(pid) == session) and int(fields[3]) == session:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, IndexError, ValueError):
            pass
    return total


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("hostile")
    marker = "autoresearch-late-" + secrets.token_hex(6)
    repo = make_repo(tmp, HOSTILE.replace("@ENDLESS_MIB@", "16").replace("@MARKER@", marker))
    # What a run.sh killed with SIGKILL leaves: its work dir with the hand-off tmpfs still mounted.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(os.environ.get("TMPDIR", "/tmp")) / f"autoresearch-run-{dead.pid}.test{secrets.token_hex(3)}"
    (stale / "out").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stale", str(stale / "out")], check=True)
    peak, stop, log_types = [0], threading.Event(), set()

    def watch():
        n = 0
        while not stop.is_set():
            for p in list(procs):
                peak[0] = max(peak[0], rss_of_shells(p.pid))
                if n % 20 == 0:   # podman is slow to ask: once a second, how it logs the container's output
                    for c in containers_of(p.pid):
                        log_types.add(subprocess.run(["podman", "inspect", "--format", "{{.HostConfig.LogConfig.Type}}",
                                                      c], capture_output=True, text=True).stdout.strip())
            n += 1
            time.sleep(0.05)
    procs = []
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    e = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="20",
             AUTORESEARCH_GRACE="90", AUTORESEARCH_EVAL_TIMEOUT="60", AUTORESEARCH_MEMORY="2g",
             AUTORESEARCH_HANDOFF_SIZE="64m", AUTORESEARCH_PIDS="256")
    try:
        p = subprocess.Popen(["./run.sh"], cwd=repo, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        procs.append(p)
        out, err = p.communicate(timeout=400)
    finally:
        stop.set()
        th.join()
        subprocess.run(["umount", str(stale / "out")], capture_output=True)
    time.sleep(2)   # the late writer would have written by now
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.lines, r.probes, r.peak_rss_kib, r.log_types = out.split("\n"), probes(r), peak[0], log_types - {""}
    r.run_dir, r.repo, r.stale, r.marker = repo / "runs" / "last", repo, stale, marker
    print(out[-5000:], err)
    return r


def test_hostile_run_still_completes(hostile):
    assert hostile.returncode == 0, hostile.stdout[-3000:] + hostile.stderr
    assert hostile.probes["done"] == "exiting" and "val_n: 16" in hostile.lines


def test_handoff_size_is_limited(hostile):
    assert "No space left on device" in hostile.probes["fill"]                      # it tried, and hit the limit
    assert 40 <= int(hostile.probes["fill_mib"]) <= 64                              # AUTORESEARCH_HANDOFF_SIZE=64m
    assert "File too large" in hostile.probes["sparse"]                             # apparent size: ulimit fsize
    assert hostile.probes["fsize_limit"] == f"({64 << 20}, {64 << 20})"


def test_handoff_file_count_is_limited(hostile):
    assert "No space left on device" in hostile.probes["inodes"]
    assert 900 <= int(hostile.probes["inode_count"]) < 1000


def test_core_dumps_are_off(hostile):
    assert hostile.probes["core_limit"] == "(0, 0)"
    assert hostile.probes["raise_core"].startswith("blocked ValueError")


def test_threads_are_limited(hostile):
    assert "can't start new thread" in hostile.probes["threads"]
    assert 100 < int(hostile.probes["thread_count"]) < 256


def test_handoff_is_noexec(hostile):
    assert hostile.probes["exec_handoff"].startswith("blocked PermissionError")


def test_escape_codes_cannot_draw_a_fake_line(hostile):
    fakes = [l for l in hostile.lines if "FAKE" in l]
    assert len(fakes) == 3, fakes                                                   # all three were printed
    assert all(l.startswith("train| ") for l in fakes)
    assert not [l for l in hostile.lines if re.search(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]", l)]
    assert "train| [2K[1GFAKE1 val_mean_rank: 0.5" in hostile.lines


def test_endless_line_is_cut_and_memory_stays_bounded(hostile):
    assert hostile.probes["endless"] == "done"
    xs = [l for l in hostile.lines if l.startswith("train| xxxx")]
    assert sum(len(l) - len("train| ") for l in xs) == 16 << 20                   # every byte came through ...
    assert max(len(l) for l in xs) <= len("train| ") + 4096                         # ... in bounded pieces
    assert 0 < hostile.peak_rss_kib < 40 << 10, hostile.peak_rss_kib                # 16 MiB line, shells < 40 MiB


def test_nested_escape_codes_cannot_reassemble_once_stripped(tmp_path, data):
    """Issue 18: stripping a C1 escape (U+009B CSI, U+0085 NEL as UTF-8) must not join the bytes around it into a new
    one: \\xc2 \\xc2\\x9b \\x9b, with the inner CSI dropped, was a CSI again; so was \\xc2 ESC \\x9b with ESC dropped."""
    repo = make_repo(tmp_path, r'''
import sys
w = sys.stdout.buffer.write
w(b"PROBE nested: printed\n")
w(b"NESTED1 \xc2\xc2\x9b\x9b2K\xc2\xc2\x9b\x9b1GFAKE val_mean_rank: 0.5\n")     # CSI inside CSI
w(b"NESTED2 \xc2\xc2\xc2\x9b\x9b\x9b2K FAKE\n")                                  # three deep
w(b"NESTED3 \xc2\x1b\x9b2K \xc2\x00\x85 \xc2\r\x9b FAKE\n")                     # joined across dropped bytes
w(b"NESTED4 \xc2\xc2\x85\x85val_mean_rank: 0.1\n")                             # NEL: a line break to splitlines()
w("KEEP caf\u00e9 \u20ac \u00a0 end\n".encode())                                 # real text stays as it is
sys.stdout.flush()
''')
    e = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="20",
             AUTORESEARCH_GRACE="30", AUTORESEARCH_EVAL_TIMEOUT="60", AUTORESEARCH_MEMORY="2g")
    p = subprocess.run(["./run.sh"], cwd=repo, env=e, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    lines = p.stdout.decode("utf-8", "replace").split("\n")   # bytes: what a terminal would be sent
    assert "train| PROBE nested: printed" in lines, p.stdout[-2000:] + p.stderr[-2000:]
    nested = [l for l in lines if "NESTED" in l]
    assert len(nested) == 4 and all(l.startswith("train| NESTED") for l in nested), nested
    assert not [l for l in lines if re.search(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]", l)], nested
    assert "train| KEEP caf\u00e9 \u20ac \u00a0 end" in lines


@pytest.mark.parametrize("stats", ['{"num_steps": 1' + "0" * 400 + ', "training_seconds": 2.5}',
                                   '{"num_steps": ' + "[" * 5000 + "]" * 5000 + ', "training_seconds": 2.5}'],
                         ids=["integer_beyond_a_float", "nesting_beyond_the_parser"])
def test_train_stats_that_no_float_holds_are_a_note_not_a_crash(tmp_path, data, stats):
    """Issue 18: train_stats.json is informational; an integer beyond a float (math.isfinite raised OverflowError) or
    nesting deeper than the JSON parser's recursion (RecursionError) crashed the trusted evaluator with a traceback,
    and a valid model was refused."""
    repo = make_repo(tmp_path, EXPORT_MODEL + f'''
open(os.path.join(OUT, "train_stats.json"), "w").write({stats!r})
print("PROBE stats: written", flush=True)
''')
    p = run(repo, data)
    assert probes(p)["stats"] == "written"
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    assert "val_n: 16" in p.lines and "Traceback (most recent call last):" not in p.stdout + p.stderr
    assert "note: train_stats.json has no valid number for num_steps" in p.lines or \
        "note: no readable train_stats.json in the run directory" in p.lines
    assert "num_steps" not in parse_metrics(p.stdout)


def test_an_archive_cut_short_is_refused_with_its_reason_not_a_traceback(tmp_path, data):
    """Issue 18: an entry whose sizes run past the end of the archive made zipfile raise EOFError, which the archive
    check did not catch: the trusted evaluator died with a traceback and the verdict had no reason."""
    repo = make_repo(tmp_path, EXPORT_MODEL + r'''
import struct
path = os.path.join(OUT, "text_encoder.pt2")
b = bytearray(open(path, "rb").read())
cd = b.rfind(b"PK\x01\x02")                                   # the last entry: sizes past the end of the file
b[cd + 20:cd + 28] = struct.pack("<II", 0x7ffffff0, 0x7ffffff0)
local = struct.unpack("<I", b[cd + 42:cd + 46])[0]
b[local + 18:local + 26] = struct.pack("<II", 0x7ffffff0, 0x7ffffff0)
open(path, "wb").write(bytes(b))
print("PROBE archive: cut short", flush=True)
''')
    p = run(repo, data)
    assert probes(p)["archive"] == "cut short"
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr
    assert "Traceback (most recent call last):" not in p.stdout + p.stderr, p.stdout[-3000:]
    assert p.lines[-1].startswith("run.sh: REFUSED by the evaluator: cannot load /out/text_encoder.pt2: not a "
                                  "torch.export archive (EOFError"), p.lines[-1]


def test_podman_keeps_no_second_copy_of_the_output(hostile):
    # podman's default (k8s-file) writes everything the container prints to a file on the host's disk as well
    assert hostile.log_types == {"none"}


def test_only_expected_regular_files_come_back_with_sane_permissions(hostile):
    files = sorted(hostile.run_dir.iterdir())
    assert [f.name for f in files] == ["image_encoder.pt2", "text_encoder.pt2", "train_stats.json"]
    for f in files:
        st = f.lstat()
        assert stat_ok(st), (f, oct(st.st_mode))
    d = hostile.run_dir.stat()
    assert d.st_uid == os.getuid() and d.st_mode & 0o022 == 0                      # not 0777 any more


def stat_ok(st):
    import stat as s
    return s.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and s.S_IMODE(st.st_mode) & 0o7022 == 0


def test_nothing_writes_after_training_ended(hostile):
    import hashlib
    assert hostile.probes["late_writer"] == "started"
    assert "train| PROBE late_writer: wrote" not in hostile.lines
    assert hashlib.sha256((hostile.run_dir / "image_encoder.pt2").read_bytes()).hexdigest() == \
        hostile.probes["image_sha"]
    assert host_processes_with(hostile.marker) == []


def test_stale_handoff_of_a_killed_run_sh_is_removed(hostile):
    assert not hostile.stale.exists()


def test_fifo_and_symlink_as_model_files_are_not_handed_over(tmp_path, data):
    repo = make_repo(tmp_path, EXPORT_MODEL + r'''
os.rename("/out/text_encoder.pt2", "/out/real_text.pt2")
os.symlink("/out/real_text.pt2", "/out/text_encoder.pt2")   # a valid model, but behind a symlink
os.remove("/out/train_stats.json")
os.mkfifo("/out/train_stats.json")                           # would block a reader forever
print("PROBE planted: symlink and fifo", flush=True)
''')
    p = run(repo, data)
    assert probes(p)["planted"] == "symlink and fifo"
    assert p.returncode == 1 and p.lines[-1].startswith("run.sh: FAILED train.py handed off no text_encoder.pt2 "), \
        p.stdout + p.stderr                                                         # it says which file is missing
    assert p.seconds < 50                                                           # no wait for the eval timeout
    assert sorted(f.name for f in (repo / "runs" / "last").iterdir()) == ["image_encoder.pt2"]


def test_core_dump_does_not_land_on_the_host(tmp_path, data):
    repo = make_repo(tmp_path, r'''
import os, resource
try:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
    print("PROBE raise_core: allowed", flush=True)
except ValueError as e:
    print(f"PROBE raise_core: blocked {e}", flush=True)
os.chdir("/out")                                  # core_pattern "core": the dump goes to the working directory
hog = b"x" * (200 << 20)
print("PROBE abort: now", flush=True)
os.abort()
''')
    p = run(repo, data)
    assert probes(p)["abort"] == "now" and probes(p)["raise_core"].startswith("blocked")
    # SIGABRT, or SIGSEGV: as PID 1 the abort signal itself is ignored and glibc falls back to a fault
    assert p.returncode == 1 and p.lines[-1] in ("run.sh: FAILED train.py exited with code 134",
                                                 "run.sh: FAILED train.py exited with code 139"), p.stdout
    left = sorted(str(f.relative_to(repo)) for f in repo.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert left == sorted(["prepare_data.py", "run.sh", "train.py",
                           *(f"engine/{f.name}" for f in (ROOT / "engine").glob("*.py"))]), left


# ------------------------------------------------------------------------------- §3 an OOM kill leaves no trace

def test_out_of_memory_leaves_the_repository_clean(tmp_path, data):
    repo = make_repo(tmp_path, 'print("PROBE hog: start", flush=True)\nhog = [b"x" * (64 << 20) for _ in range(64)]\n')
    p = run(repo, data, AUTORESEARCH_MEMORY="256m")
    assert probes(p)["hog"] == "start"
    assert p.returncode == 137 and p.lines[-1].startswith("run.sh: OUT OF MEMORY")
    assert sorted(f.name for f in repo.iterdir()) == ["engine", "prepare_data.py", "run.sh", "runs",
                                                     "train.py"]   # no `oom`


# ------------------------------------------------------------------------------- §5 host mode from a virtualenv

def test_host_mode_runs_the_virtualenv_python(tmp_path, data):
    venv = tmp_path / "venv"   # under /tmp: masked in the sandbox, so it must be bound back
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert site.startswith(str(venv))
    Path(site, "only_in_the_venv.py").write_text("WHERE = 'venv'\n")
    repo = make_repo(tmp_path, "import sys, only_in_the_venv\n"
                               "print('PROBE venv:', only_in_the_venv.WHERE, sys.prefix, flush=True)\n" + EXPORT_MODEL)
    p = run(repo, data, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert probes(p)["venv"] == f"venv {venv}"
    assert "val_n: 16" in p.lines


# ------------------------------------------------------------------------------- issue 12 §7 exit codes

def test_podman_that_cannot_start_is_a_setup_error(tmp_path, data):
    repo = make_repo(tmp_path, EXPORT_MODEL)
    p = run(repo, data, AUTORESEARCH_PODMAN_ARGS="--runtime /nonexistent/runtime")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "podman could not start the container (podman exit 125" in p.stderr
    assert "FAILED" not in p.stdout


def test_train_py_exiting_125_is_its_own_failure(tmp_path, data):
    repo = make_repo(tmp_path, "print('PROBE exit: 125', flush=True)\nraise SystemExit(125)\n")
    p = run(repo, data)
    assert probes(p)["exit"] == "125"
    assert p.returncode == 1 and p.lines[-1] == "run.sh: FAILED train.py exited with code 125"


# run.sh reads train.py's imports on the host (with ast) to import them before the go: its hostile shapes must
# neither stop, slow nor steer the run, which gets the verdict train.py earns.
@pytest.mark.parametrize("shape", ["many imports", "unparseable"])
def test_train_py_imports_read_on_the_host_do_not_change_its_verdict(tmp_path, data, shape):
    if shape == "many imports":   # 10^5 imports and a module nowhere to be found
        head = "import os\n" * 100_000 + "try:\n    import no_such_module_x, os as __import__\nexcept ImportError:" \
               "\n    pass\nfrom os import path as _p, sep as _s\n"
    else:                         # too deeply nested for Python's parser, on the host and in the container alike
        head = "x = " + "-" * 200_000 + "1\n"
    repo = make_repo(tmp_path, head + "print('PROBE started: yes', flush=True)\n" + EXPORT_MODEL)
    p = run(repo, data)
    if shape == "many imports":
        assert probes(p)["started"] == "yes"
        assert p.returncode == 0 and "val_mean_rank" in parse_metrics(p.stdout), p.stdout[-3000:] + p.stderr
    else:
        assert "started" not in probes(p)
        assert p.returncode == 1 and p.lines[-1] == "run.sh: FAILED train.py exited with code 1", p.stdout[-3000:]
    assert p.seconds < 60, p.seconds


# The preload never changes a verdict: a kept train.py with a dead import of a module that runs a CLI and raises
# SystemExit at import time (venv.__main__) once ended every later run before its go. Only allowlisted libraries that
# the committed train.py imports are preloaded, and nothing a preload raises ends the launcher.
DEAD_IMPORT = "if False:\n    import venv.__main__\n    from venv import __main__\n    import this\n"


def test_a_dead_import_in_the_kept_train_py_does_not_stop_the_next_candidate(tmp_path, data):
    repo = make_repo(tmp_path, DEAD_IMPORT + EXPORT_MODEL)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "kept"], cwd=repo, check=True)
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="3",
               AUTORESEARCH_GRACE="60", AUTORESEARCH_MEMORY="2g")
    for candidate in (EXPORT_MODEL, DEAD_IMPORT + EXPORT_MODEL):   # an honest one, and the kept one run again
        # as the loop runs a candidate: its containers start (and preload) while the model still writes train.py
        (repo / "train.py").write_text(DEAD_IMPORT + EXPORT_MODEL)
        proc = subprocess.Popen(["./run.sh", "--wait"], cwd=repo, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout.readline() == "run.sh: ready\n"
        time.sleep(3)                                                # the preload has run (or died) by now
        (repo / "train.py").write_text(candidate)
        out, _ = proc.communicate("go\n", timeout=300)
        assert proc.returncode == 0 and "val_mean_rank" in parse_metrics(out), out[-3000:]
        assert containers_of(proc.pid) == []


def test_a_flood_of_output_does_not_hold_up_the_clean_up_of_a_stopped_run(tmp_path, data):
    """Issue 18: the harness stops a run (Ctrl-C, a cancelled round) with SIGTERM to run.sh's group and reads no more
    while it waits for it to end. A train.py that floods its output kept run.sh's output thread blocked on the full
    pipe, and run.sh's clean-up waited for that thread before anything else: the evaluation container stayed up and
    the hand-off tmpfs (RAM, up to AUTORESEARCH_HANDOFF_SIZE) stayed mounted until run.sh was killed, and after."""
    repo = make_repo(tmp_path, r'''
import os
print("PROBE flood: start", flush=True)
line = b"x" * 1000 + b"\n"
while True:
    os.write(1, line)
''')
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="60",
               AUTORESEARCH_GRACE="60", AUTORESEARCH_EVAL_TIMEOUT="60", AUTORESEARCH_MEMORY="2g")
    p = subprocess.Popen(["./run.sh"], cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while b"train| PROBE flood: start\n" not in seen:
        chunk = os.read(p.stdout.fileno(), 1 << 16)
        assert chunk, seen[-2000:]
        seen = seen[-(1 << 16):] + chunk
    tmp = os.environ.get("TMPDIR", "/tmp")

    def left():
        mounts = [l for l in Path("/proc/mounts").read_text().split("\n") if f"/autoresearch-run-{p.pid}." in l]
        return containers_of(p.pid), mounts, [d for d in os.listdir(tmp) if d.startswith(f"autoresearch-run-{p.pid}.")]
    assert left()[0] and left()[1], left()          # both containers up, the hand-off mounted
    os.killpg(p.pid, signal.SIGTERM)                # as the harness stops a run: and now nobody reads
    deadline = time.time() + 60
    while left() != ([], [], []) and time.time() < deadline:
        time.sleep(0.5)
    stalled = left()
    rest = p.stdout.read()                          # the reader is back: run.sh says its verdict and ends
    assert p.wait(timeout=60) == 143
    assert stalled == ([], [], []), stalled
    assert rest.rstrip(b"\n").split(b"\n")[-1].startswith(b"run.sh: INTERRUPTED by SIGTERM")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_without_sandbox_is_reported_and_stops_train_py(tmp_path, data, sig, code):
    marker = "autoresearch-nosb-" + secrets.token_hex(6)
    repo = make_repo(tmp_path, f'''
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{marker}"])
print("ready", flush=True)
while True:
    time.sleep(1)
''')
    env = dict(os.environ, AUTORESEARCH_SANDBOX="none", AUTORESEARCH_DATA=str(data))
    p = subprocess.Popen(["./run.sh"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line == "train| ready\n":
            break
    os.killpg(p.pid, sig)
    rest = p.stdout.read().splitlines()
    assert p.wait(timeout=30) == code
    assert rest[-1].startswith(f"run.sh: INTERRUPTED by {sig.name}"), rest
    assert host_processes_with(marker) == []


# ------------------------------------------------------------------------------- the loop: OOM, then a set-up error

LOOP_FILES = ["autoresearch.py", "engine", "train.py", "run.sh", "prepare_data.py", "program.md",
              "scratchpad.md", ".gitignore"]
ANCHOR = "    torch.manual_seed(SEED)\n"




def test_loop_survives_out_of_memory_and_stops_on_a_setup_error(tmp_path):
    """One loop: the baseline; a candidate that runs out of memory (a crash, and no `oom` file makes the tree dirty);
    a normal candidate that must run and be recorded; then the data cache vanishes while the model works, and the
    next run.sh exits 2: the loop stops with run.sh's message instead of blaming (and "fixing") the model."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--out", str(data), "--n-train", "64",
                    "--n-val", "16", "--n-test", "16"], check=True, capture_output=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_into(repo, LOOP_FILES)
    assert (repo / "train.py").read_text().count(ANCHOR) == 1
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "template")

    def vanish(req):
        (data / "meta.json").rename(data / "meta.json.gone")
        return tool_call("run_experiment", description="anything")
    script = [
        tool_call("edit_file", path="train.py", old_text=ANCHOR,
                  new_text='    hog = [b"x" * (64 << 20) for _ in range(64)]\n' + ANCHOR),
        tool_call("run_experiment", description="hold 4 GiB"),
        tool_call("edit_file", path="train.py", old_text="WEIGHT_DECAY = 1e-4", new_text="WEIGHT_DECAY = 2e-4"),
        tool_call("run_experiment", description="more weight decay"),
        tool_call("edit_file", path="train.py", old_text="GRAD_CLIP = 1.0", new_text="GRAD_CLIP = 2.0"),
        vanish,
    ]
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="2",
               AUTORESEARCH_MEMORY="2g", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    env.pop("AUTORESEARCH_SANDBOX", None)
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        env["OLLAMA_HOST"] = fake.url
        p = subprocess.run([sys.executable, "autoresearch.py", "--tag", "t", "--noise-runs", "2", "--fix-attempts", "0",
                            "--max-experiments", "5", "--allowance", "300"],   # the template's export, on a busy machine
                           cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    rows = load_results(str(repo / "results.tsv"))
    assert [r["status"] for r in rows][:2] == ["baseline", "crash"], rows
    assert rows[1]["reason"] == "out of memory; log: logs/1.log"
    assert rows[2]["status"] in ("keep", "discard") and rows[2]["description"] == "more weight decay", rows
    assert [r["status"] for r in rows][3:] == ["interrupted"], rows               # not a crash of the model
    assert p.returncode == 2 and "Traceback" not in p.stderr and fake.remaining == 0, p.stdout + p.stderr
    assert "could not run the sandbox" in p.stderr and "no data cache" in p.stderr, p.stderr
    assert float(rows[0]["train_wall_seconds"]) > 2
    assert not (repo / "oom").exists() and git(repo, "status", "--porcelain") == ""


@pytest.fixture
def visible_dir():
    """A world-readable folder outside every path host mode masks anyway (/tmp is a tmpfs in there)."""
    path = Path(tempfile.mkdtemp(prefix="autoresearch-test-", dir="/opt"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_workers_train_py_cannot_read_the_main_checkout(visible_dir, data):
    """--workers N runs ./run.sh in a git worktree inside the main checkout, whose runs/ hold the other workers'
    hand-offs (a candidate could hand one off as its own): host mode masks the main checkout too."""
    main = make_repo(visible_dir, "")
    (main / "runs" / "7").mkdir(parents=True)
    (main / "runs" / "7" / "image_encoder.pt2").write_text("another worker's model")
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                 ["worktree", "add", "-q", "--detach", ".worktrees/w0"]):
        subprocess.run(["git", *args], cwd=main, check=True, capture_output=True)
    worktree = main / ".worktrees" / "w0"
    (worktree / "train.py").write_text(f'''import os
print("PROBE main:", sorted(os.listdir({str(main)!r})), flush=True)
try:
    print("PROBE other:", open({str(main / "runs" / "7" / "image_encoder.pt2")!r}).read(), flush=True)
except OSError as e:
    print("PROBE other: refused", type(e).__name__, flush=True)
''')
    p = run(worktree, data)
    # only the mount point of the worktree's own mask is left of the main checkout
    assert probes(p) == {"main": "['.worktrees']", "other": "refused FileNotFoundError"}, p.stdout + p.stderr
    assert p.returncode == 1   # and it handed off nothing
