"""The sandbox: one experiment, train.py in a locked-down container, then the trusted evaluator in a second one.

./run.sh is the entry point (its header documents the flags, the environment, the output and the exit codes): it runs
`python3 -m engine.sandbox RUN_SH [ARGS]` from the repository on the host's python3; standard library only, and every
command an argument list, never a shell string. The two steps, training and evaluation, start together, each held at a
gate until its go; a watchdog in a session of its own enforces each step's limit from its go; the verdict is the last
line printed, after everything has been stopped and removed.
"""
import contextlib
import glob
import hashlib
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from subprocess import DEVNULL, PIPE, STDOUT

from engine.settings import env_problems, setting
from engine.verdicts import EVALUATOR, Exit

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
EVALUATE = ["-m", "engine.evaluator"]   # the trusted evaluator, run from the repository (the evaluation mounts engine/)
USAGE = "usage: ./run.sh [--wait]  |  ./run.sh --test RUN_DIR  |  ./run.sh --build"
C_CODE, C_DATA, C_OUT, C_WEIGHTS = "/workspace", "/data", "/out", "/weights"   # paths in the containers
IMAGE_USER = "1000:1000"   # the Containerfile's USER
HOST_USER = "65534:65534"  # "nobody", in host mode
STATS = "train_stats.json"
HANDOFF_FILES = 1000       # inodes of the hand-off tmpfs
WAIT_MAX = 3600            # --wait: how long run.sh waits for its go
CUT = 4096                 # train.py's lines are cut into pieces of at most this many bytes
ROOTLESS = os.geteuid() != 0
START = time.monotonic()

# The training step's entry point. Before its go it imports the heavy, installed packages (PRELOAD) that the committed
# train.py imports (HEAD's, never a file the model is still writing; the working one outside git); at its go, run.sh
# copies train.py to PATH (read-only in the container) and says go on stdin, and it runs PATH as `python PATH` would.
# Only installed libraries on that list are preloaded, never a module of the candidate's choosing (a dead
# `import venv.__main__` once ran a CLI and ended every later run), and whatever a preload raises, SystemExit
# included, the run goes on without it. On the way out gc.freeze() spares Python a last collection over the ~2500
# modules torch and export load: 1-2 s of every run. Source passed with -c: the container sees only /workspace.
LAUNCHER = r'''
import ast, gc, importlib, os, re, runpy, sys
PRELOAD = {"numpy", "torch", "torchvision", "timm", "transformers", "tokenizers", "einops", "scipy", "sklearn", "PIL"}
if sys.argv[1] == "--imports":
    names = []
    for node in ast.walk(ast.parse(sys.stdin.buffer.read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module + ":" + a.name for a in node.names]
    names = [n for n in names if re.fullmatch(r"[A-Za-z]\w*(\.[A-Za-z]\w*)*(:[A-Za-z]\w*)?", n)
             and re.split(r"[.:]", n)[0] in PRELOAD]
    print(*list(dict.fromkeys(names))[:200])
    sys.exit()
path = sys.argv[1]
for name in sys.argv[2:]:
    module, _, attr = name.partition(":")
    try:
        getattr(importlib.import_module(module), attr, None)
    except BaseException:
        pass
if sys.stdin.read() != "go\n":
    sys.exit(1)   # run.sh stopped before its go, and says so
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
sys.argv, sys.path[0] = [path], os.path.dirname(path)
try:
    runpy.run_path(path, run_name="__main__")
finally:
    gc.freeze()
'''
# A step's watchdog sleeps until the step's limit, then becomes the command that stops the step. It runs in a session
# of its own, so that it still fires if run.sh is killed with SIGKILL meanwhile.
WATCHDOG = "import os, sys, time; time.sleep(float(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])"

NONE_WARNING = """\
################################################################################
# run.sh: WARNING: AUTORESEARCH_SANDBOX=none -- train.py runs WITHOUT a sandbox: #
# it has your network, your files and your secrets. Development use only.       #
################################################################################
"""


class Verdict(BaseException):
    """How the run ends: its exit code and last lines, on stdout (a set-up error's on stderr)."""
    def __init__(self, code, *lines, err=False):
        super().__init__(code)
        self.code, self.lines, self.err = code, lines, err


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached run.sh."""


def die(message):
    raise Verdict(Exit.SETUP, f"run.sh: {message}", err=True)


def env(name, default=""):
    """A variable as bash's ${NAME:-default} reads it: empty counts as unset."""
    return os.environ.get(name) or default


def warn(text):
    with contextlib.suppress(OSError):
        sys.stderr.write(text)
        sys.stderr.flush()


def quiet(argv):
    """The exit code of a helper command, its output discarded (127: not installed)."""
    try:
        return subprocess.run(argv, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL).returncode
    except OSError:
        return 127


def output(argv, **kw):
    """A helper command's stdout, or None if it failed."""
    try:
        p = subprocess.run(argv, stdin=DEVNULL, capture_output=True, **kw)
    except OSError:
        return None
    return p.stdout if p.returncode == 0 else None


def ns(argv):
    """Rootless podman keeps its own user and mount namespace: the hand-off tmpfs is mounted, read and removed there."""
    return ["podman", "unshare", *argv] if ROOTLESS else argv


def end(proc, group=False):
    """A helper process (with group: its whole process group) killed and reaped, once."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
    proc.wait()


def ms_since(t0):
    return int((time.monotonic() - t0) * 1000)


def seconds(name, ms):   # tenths, cut (not rounded) as they always were
    return f"{name}: {ms // 1000}.{ms % 1000 // 100}"


def iec_bytes(size):
    """Bytes of a size as `numfmt --from=iec` reads it (2g, 1.5G, 500m, 1024), rounded up."""
    whole, frac, unit = re.fullmatch(r"([0-9]+)(?:\.([0-9]+))?([kmgt]?)", size.lower()).groups(default="")
    return -(-int(whole + frac) * 1024 ** "_kmgt".find(unit or "_") // 10 ** len(frac))


def check_env():
    """The variables a user sets, each checked as the user named it (autoresearch.py checks the same before it starts)."""
    for problem in env_problems()[:1]:
        die(problem)


def read_preload():
    """The preload list of the committed train.py (else of the working one), read by the launcher in a child with
    10 s: a hostile file (10^5 imports, nesting too deep to parse) costs at most its own preload."""
    src = output(["git", "-C", REPO, "show", "HEAD:./train.py"])
    if src is None:
        try:
            with open(os.path.join(REPO, "train.py"), "rb") as f:
                src = f.read()
        except OSError:
            src = b""
    try:
        p = subprocess.run([sys.executable, "-c", LAUNCHER, "--imports"], input=src, capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return []
    return p.stdout.decode(errors="replace").partition("\n")[0].split()


def podman_setup():
    """(run flags, build flags), or AUTORESEARCH_PODMAN_ARGS (word-split) in their place. As root (this machine) runc
    (crun fails under hybrid cgroups) and explicit ulimits (podman's defaults exceed what the host allows and are
    refused). Rootless (a workstation): --userns=keep-id makes the container user the invoking user, who owns the
    hand-off; its memory and pids limits need cgroups v2 with delegation, so v1 gets a warning."""
    if setting("AUTORESEARCH_PODMAN_ARGS"):
        return setting("AUTORESEARCH_PODMAN_ARGS").split(), []
    if not ROOTLESS:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        hard = "unlimited" if hard == resource.RLIM_INFINITY else hard
        return ["--runtime", "runc", "--ulimit", f"nofile={hard}:{hard}", "--ulimit", "nproc=4096:4096"], \
            ["--runtime", "runc"]
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        warn("run.sh: WARNING: rootless podman on cgroups v1 cannot enforce --memory/--pids-limit\n")
    return ["--userns=keep-id"], []


def gpu_args():
    """GPUs: only with the driver AND an NVIDIA CDI spec (nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml); in a
    SLURM job only the GPUs it was granted (podman's containers run outside the job's cgroup)."""
    if not shutil.which("nvidia-smi") or not glob.glob("/etc/cdi/nvidia*.yaml") + glob.glob("/var/run/cdi/nvidia*.yaml"):
        return []
    ids = env("SLURM_STEP_GPUS") or env("SLURM_JOB_GPUS") or setting("AUTORESEARCH_GPUS")
    return [arg for i in ids.split(",") if i for arg in ("--device", f"nvidia.com/gpu={i}")]


def remove_container(name):
    """Until it is gone: while a container dies (by itself, or killed by a first `podman rm`), podman's own clean-up of
    it can make `podman rm` fail or return early."""
    for _ in range(20):
        quiet(["podman", "rm", "-f", "-i", "-t", "0", name])
        if quiet(["podman", "container", "exists", name]) != 0:
            return
        time.sleep(0.5)


def read_go(timeout):
    """Whether a line "go" (blanks around it aside, as bash's read took it) comes on stdin within `timeout` s."""
    deadline, got = time.monotonic() + timeout, b""
    while b"\n" not in got and len(got) < CUT:
        left = deadline - time.monotonic()
        try:
            if left <= 0 or not select.select([0], [], [], left)[0] or not (chunk := os.read(0, CUT)):
                return False
        except OSError:
            return False
        got += chunk
    return got.partition(b"\n")[0].strip(b" \t") == b"go"


# --------------------------------------------------------------------------------------------------------------------
# Output: every line train.py prints gets the "train| " prefix, and carriage returns (progress bars) start new prefixed
# lines, so it can never forge a metric; a last line without a newline is still terminated, so the next line can't be
# glued to it. Lines longer than CUT bytes are cut into several, so an endless line can't grow run.sh's memory, and
# control characters (escape sequences, backspace; tab and CR aside) are dropped, so a log shown in a terminal can't
# move the cursor to draw an unprefixed line. A chunk at a time with bytes methods (loops in C), not a line at a time.
PREFIX = b"train| "
CONTROL = bytes(range(0x09)) + b"\x0b\x0c" + bytes(range(0x0e, 0x20)) + b"\x7f"
# The 8-bit forms of the same (C1), as UTF-8: each becomes "?", in one pass. Dropped, it would join the bytes around it
# into a new one (\xc2 \xc2\x9b \x9b: a CSI again).
C1 = re.compile(b"\xc2[\x80-\x9f]")
EVAL_ERROR = b"evaluator.py: error: "
NOT_PRINTABLE = bytes(range(0x20)) + bytes(range(0x7f, 0x100))


class Output:
    """run.sh's stdout, shared by the main thread and the steps' output threads: whole pieces under a lock. Once its
    reader is gone (a harness killed with -9) the rest is dropped, so that the run still ends and cleans up."""
    def __init__(self):
        self.lock, self.broken = threading.Lock(), False

    def write(self, data):
        with self.lock:
            data = memoryview(data)
            while data and not self.broken:
                try:
                    data = data[os.write(1, data):]
                except BlockingIOError:
                    select.select([], [1], [])
                except OSError:
                    self.broken = True

    def say(self, line):
        self.write(line.encode() + b"\n")


def prefixed(lines):
    """Raw lines as run.sh prints them: prefixed, control characters dropped and C1 escapes made "?", a CR starts a new
    line."""
    text = b"\n".join(lines).translate(None, CONTROL)
    if b"\xc2" in text:
        text = C1.sub(b"?", text)
    return PREFIX + text.replace(b"\r", b"\n").replace(b"\n", b"\n" + PREFIX) + b"\n"


def prefix_train(f, write):
    """train.py's output from the file `f` to `write`, prefixed, in whole lines; it holds CUT + 64 KiB at most."""
    rest = b""
    while chunk := f.read(1 << 16):
        lines = (rest + chunk.replace(b"\0", b"")).split(b"\n")   # NULs: as if never sent, as bash's read did
        rest = lines.pop()
        if len(rest) > CUT:   # an endless line: its whole pieces now
            keep = (len(rest) - 1) // CUT * CUT
            lines.append(rest[:keep])
            rest = rest[keep:]
        if lines:
            if max(map(len, lines)) > CUT:
                lines = [line[i:i + CUT] for line in lines for i in range(0, len(line) or 1, CUT)]
            write(prefixed(lines))
    if rest:
        write(prefixed([rest]))


def eval_reason(f, write):
    """The evaluation's output from `f` to `write` as it is; returns the reason on its last `evaluator.py: error: `
    line (printable ASCII, 500 bytes at most), to quote in the verdict."""
    line, why = b"", None
    while chunk := f.read(1 << 16):
        write(chunk)
        *whole, line = (line + chunk).split(b"\n")
        why = next((w for w in reversed(whole) if w.startswith(EVAL_ERROR)), why)
        line = line[:CUT]
    why = line if line.startswith(EVAL_ERROR) else why
    return why and why[len(EVAL_ERROR):len(EVAL_ERROR) + 500].translate(None, NOT_PRINTABLE).decode()


class Step:
    """Training or evaluation: its process (`podman run`, or `timeout` without a sandbox), its container, the thread
    that passes its output on, and from its go its feeder (what goes in on stdin) and its watchdog."""
    def __init__(self, name, proc, container):
        self.name, self.proc, self.container = name, proc, container
        self.thread = self.feeder = self.watchdog = None


class Run:
    """One run.sh: its settings, what it holds (work dir, hand-off mount, steps) and how it ends."""
    def __init__(self):
        self.out, self.steps, self.eval_error = Output(), {}, None
        self.work = self.train_ms = self.signum = None
        self.mounted = self.closing = self.deferred = self.wait = self.test_split = self.build_only = False
        self.hold = 0
        self.sandbox = setting("AUTORESEARCH_SANDBOX") != "none"

    # ------------------------------------------------------------------------------------------------------ signals
    def on_signal(self, signum, _frame):
        """SIGINT/SIGTERM: stop now, or at the end of a held block. Both are ignored from here on, so that a second one
        cannot cut the clean-up short (the harness's SIGKILL comes 20 s later)."""
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        self.signum = signum
        if self.hold:
            self.deferred = True
        elif not self.closing:
            raise Interrupted()

    @contextlib.contextmanager
    def held(self):
        """A signal waits for the end of this block, so that a process started or a mount made is on record."""
        self.hold += 1
        try:
            yield
        finally:
            self.hold -= 1
            if self.deferred and not self.hold and not self.closing:
                self.deferred = False
                raise Interrupted()

    def main(self, argv):
        """Runs; then, once and with signals ignored, cleans up; then prints the verdict, so that nothing follows it."""
        try:
            try:
                for s in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, self.on_signal)
                self.run(argv[1:])   # argv[0]: run.sh's path (it keeps "run.sh" in this process's command line)
            finally:
                self.closing = True
        except Verdict as v:
            verdict = v
        except Interrupted:
            verdict = Verdict(Exit.INTERRUPTED if self.signum == signal.SIGINT else Exit.TERMINATED,
                              f"run.sh: INTERRUPTED by {signal.Signals(self.signum).name}; training/evaluation stopped"
                              " and cleaned up")
        except Exception as e:   # a bug in here still gets the clean-up and a verdict
            verdict = Verdict(Exit.SETUP, f"run.sh: internal error: {type(e).__name__}: {e}", err=True)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        self.close()
        text = "".join(line + "\n" for line in verdict.lines)
        warn(text) if verdict.err else self.out.write(text.encode())
        return verdict.code

    # ------------------------------------------------------------------------------------------------------ the run
    def run(self, argv):
        """One experiment, --test or --build: raises the Verdict that ends it."""
        self.parse(argv)
        self.settings()
        self.make_work()
        preload = [] if self.build_only else read_preload()
        self.setup_sandbox(preload) if self.sandbox else self.setup_none(preload)
        self.programs, self.split_files = self.names()
        self.check_data()
        backstop = (WAIT_MAX if self.wait else 0) + self.train_limit
        if not self.test_split:
            self.prepare_handoff()
            self.launch("train", backstop, self.train_cmd, self.train_env)
        self.launch("eval", backstop + self.eval_timeout, self.eval_cmd, self.eval_env)
        if self.wait:
            self.out.say("run.sh: ready")
            if not read_go(WAIT_MAX):
                raise Verdict(Exit.INTERRUPTED, f"run.sh: CANCELLED: no 'go' on stdin within {WAIT_MAX}s")
            self.start = time.monotonic()   # the run starts now: total_seconds leaves the wait out
            self.check_data()               # again: the run may have waited a long time for its go
        if not self.test_split:
            self.train()
        self.out.say("--- trusted evaluation ---")
        rc, _, timed_out, oom = self.go("eval", self.eval_timeout)
        if rc:
            self.verdict("evaluation", rc, timed_out, oom, f"{self.eval_timeout}s (AUTORESEARCH_EVAL_TIMEOUT)")
        train = [] if self.train_ms is None else [seconds("train_wall_seconds", self.train_ms)]   # trusted: the
        raise Verdict(Exit.OK, *train, seconds("total_seconds", ms_since(self.start)))           # harness checks it

    def parse(self, argv):
        self.start = START
        if argv == ["--build"]:   # build the sandbox image ahead of the first experiment (it needs the network once)
            self.build_only, self.run_dir = True, ""
        elif argv and argv[0] != "--wait":
            if argv[0] != "--test" or len(argv) != 2:
                die(USAGE)
            if not os.path.isdir(argv[1]):
                die(f"no such run directory: {argv[1]}")
            self.test_split, self.run_dir = True, os.path.realpath(argv[1])
        else:
            if argv not in ([], ["--wait"]):
                die(USAGE)
            self.wait, self.run_dir = bool(argv), setting("AUTORESEARCH_RUN_DIR")
            try:
                os.makedirs(self.run_dir, exist_ok=True)
            except OSError as e:
                die(f"cannot make the run directory {self.run_dir}: {e.strerror}")
            self.run_dir = os.path.realpath(self.run_dir)

    def settings(self):
        check_env()
        self.budget = int(setting("AUTORESEARCH_TIME_BUDGET"))
        self.grace = int(setting("AUTORESEARCH_GRACE"))
        self.eval_timeout = int(setting("AUTORESEARCH_EVAL_TIMEOUT"))
        self.memory = setting("AUTORESEARCH_MEMORY")
        self.pids = setting("AUTORESEARCH_PIDS")
        self.shm = setting("AUTORESEARCH_SHM_SIZE")
        self.handoff_bytes = iec_bytes(setting("AUTORESEARCH_HANDOFF_SIZE"))
        self.cpus = setting("AUTORESEARCH_CPUS")   # podman --cpus, and its whole part (at least 1) as OMP_NUM_THREADS
        self.threads = str(max(1, int(self.cpus.partition(".")[0] or 0))) if self.cpus else ""
        self.train_limit = self.budget + self.grace
        self.split = "test" if self.test_split else "val"
        self.data = setting("AUTORESEARCH_DATA")
        if not self.build_only:
            if not os.path.isdir(self.data):
                die(f"no data cache at '{self.data}'. Run: python prepare_data.py")
            self.data = os.path.realpath(self.data)
        weights = setting("AUTORESEARCH_WEIGHTS")
        self.weights = os.path.realpath(weights) if os.path.isdir(weights) else ""

    def make_work(self):
        """A private working directory, removed at the end: podman runs from here (conmon drops an `oom` file into its
        working directory, which must never land in the repository); it holds train.py once it gets its go, the
        hand-off tmpfs and host mode's masks. Its name holds run.sh's pid: a later run removes it once that is gone."""
        with self.held():
            self.work = tempfile.mkdtemp(prefix=f"autoresearch-run-{os.getpid()}.", dir=env("TMPDIR", "/tmp"))
        os.mkdir(f"{self.work}/code")
        self.handoff = f"{self.work}/out"

    def common_env(self, out, data, weights):
        """The environment train.py and the evaluator see, in every mode."""
        e = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "AUTORESEARCH_OUT": out, "AUTORESEARCH_DATA": data, "AUTORESEARCH_TIME_BUDGET": str(self.budget)}
        if setting("AUTORESEARCH_SEED"):
            e["AUTORESEARCH_SEED"] = setting("AUTORESEARCH_SEED")
        if self.threads:
            e["OMP_NUM_THREADS"] = self.threads
        if weights:
            e.update(AUTORESEARCH_WEIGHTS=weights, HF_HOME=weights, TORCH_HOME=f"{weights}/torch")
        return e

    # ------------------------------------------------------------------------------------------------------ set-ups
    def setup_none(self, preload):
        """No sandbox, for development only: the same output and time limits, but train.py can see and do anything the
        user can."""
        if self.build_only:
            raise Verdict(Exit.OK, "run.sh: AUTORESEARCH_SANDBOX=none: no image to build")
        warn(NONE_WARNING)
        py = env("PYTHON", "python3")
        self.train_env = {**os.environ, **self.common_env(self.run_dir, self.data, self.weights)}
        self.eval_env = {**self.train_env, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
                         "AUTORESEARCH_EVAL_TIMEOUT": str(self.eval_timeout),
                         "AUTORESEARCH_BATCH_TOLERANCE": setting("AUTORESEARCH_BATCH_TOLERANCE")}
        self.train_cmd = [py, "-c", LAUNCHER, f"{self.work}/code/train.py", *preload]
        self.eval_cmd = [py, *EVALUATE, "--evaluate", self.run_dir, "--split", self.split, "--data", "-"]

    def setup_sandbox(self, preload):
        """The sandbox: podman, run from the private working directory, in image mode or host mode."""
        if not shutil.which("podman"):
            die("podman is not installed. Install it (Debian/Ubuntu: sudo apt-get install podman;\n  Fedora: sudo dnf"
                " install podman; see https://podman.io/docs/installation), or, for development only,\n  run with "
                "AUTORESEARCH_SANDBOX=none")
        os.chdir(self.work)
        setup, build_setup = podman_setup()
        self.clean_stale()
        host = setting("AUTORESEARCH_IMAGE") == "host"
        rootfs = ["--rootfs", "/:O"] if host else [self.image(build_setup)]   # LAST: with --rootfs, the path takes
        if self.build_only:                                                     # the image's place
            raise Verdict(Exit.OK, f"run.sh: sandbox image ready: {' '.join(rootfs)}")
        py, user, mode = self.host_mode() if host else ("python", IMAGE_USER, ["--tmpfs", "/tmp:rw,notmpcopyup"])
        self.user = "" if ROOTLESS else user   # rootless: keep-id already runs as the invoking user
        self.train_env = self.eval_env = None
        self.containers(setup + gpu_args(), mode + rootfs, py, preload)

    def clean_stale(self):
        """A run.sh killed with SIGKILL can't clean up: its containers are removed by their watchdogs at the limit (a
        waiting one only by conmon's backstop) or stay listed, and its work dir may still hold the hand-off tmpfs.
        Those whose run.sh (the pid in the name) is gone are removed; live ones belong to parallel runs."""
        def gone(name, prefix, sep):
            pid = name[len(prefix):].partition(sep)[0]
            return re.fullmatch("[0-9]+", pid) and not os.path.exists(f"/proc/{pid}")
        names = output(["podman", "ps", "-a", "--filter", "label=autoresearch=1", "--format", "{{.Names}}"], text=True)
        for c in (names or "").split():
            if gone(c, "autoresearch-", "-"):
                quiet(["podman", "rm", "-f", "-t", "0", c])
        for d in glob.glob(f"{env('TMPDIR', '/tmp')}/autoresearch-run-*.*"):
            if os.path.isdir(d) and gone(os.path.basename(d), "autoresearch-run-", "."):
                quiet(ns(["umount", f"{d}/out"]))
                quiet(["rm", "-rf", "--one-file-system", d])   # never into a hand-off that failed to unmount

    def host_mode(self):
        """Host mode: the host's / as a copy-on-write overlay, read-only on top, run as "nobody". What "nobody" could
        read on the host is readable in there, except the masks: homes (secrets), scratch dirs, mounts, the repository
        (and the main checkout around a worker's worktree, whose runs/ hold the other workers' hand-offs), the data
        cache (val/test!), the run dir and the weights. LIMITATION: only these exact paths are masked, so any OTHER copy
        of the data readable by "nobody" is readable in there too (README); the image mode has no such gap. This
        interpreter (the python3 on PATH, as is: its realpath would miss a virtualenv) and its trees are bound back."""
        skel = f"{self.work}/mask"
        os.mkdir(skel)
        os.chmod(skel, 0o755)
        # Runc gives a tmpfs the mode of the directory it covers (/root is 0700: the bound-back Python would be out of
        # reach for "nobody"); an empty 0755 host directory bound over the path masks it without that problem. Plain
        # --tmpfs would copy the directory's content in (tmpcopyup): notmpcopyup is essential.
        mode = ["--tmpfs", "/tmp:rw,notmpcopyup", "--tmpfs", "/var/tmp:rw,notmpcopyup", "--tmpfs", "/run:rw,notmpcopyup"]
        main = (output(["git", "-C", REPO, "rev-parse", "--path-format=absolute", "--git-common-dir"], text=True)
                or "").strip().removesuffix("/.git")
        main = "" if main == REPO or "/.git" in main else main
        masks = ["/root", "/home", "/mnt", "/media", "/srv", main, REPO, self.data, self.run_dir, self.weights]
        for i, m in enumerate(m for m in masks if m and os.path.isdir(m)):
            os.mkdir(f"{skel}/{i}")
            mode += ["-v", f"{skel}/{i}:{m}"]   # rw for runc (root) so it can create nested mount points
        for tree in dict.fromkeys((sys.base_prefix, sys.prefix)):
            mode += ["-v", f"{tree}:{tree}:ro"]
        return sys.executable, HOST_USER, mode

    def image(self, build_setup):
        """AUTORESEARCH_IMAGE, else the one built from Containerfile, rebuilt only when Containerfile or
        requirements.txt change (the tag is a hash of both) and from only these two files: data/, runs/ and weights/
        never enter it."""
        if setting("AUTORESEARCH_IMAGE"):
            return setting("AUTORESEARCH_IMAGE")
        files = [os.path.join(REPO, f) for f in ("Containerfile", "requirements.txt")]
        try:
            digest = hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()
        except OSError as e:
            die(f"cannot read {e.filename}: the sandbox image is built from Containerfile and requirements.txt (or "
                "use AUTORESEARCH_IMAGE=host)")
        image = f"localhost/autoresearch:{digest[:12]}"
        if quiet(["podman", "image", "exists", image]) != 0:
            warn(f"run.sh: building {image} from Containerfile (once; needs network access to pull the base image)\n")
            with tempfile.TemporaryDirectory() as ctx:
                for f in files:
                    shutil.copy(f, ctx)
                if subprocess.run(["podman", "build", *build_setup, "-t", image, "-f", f"{ctx}/Containerfile", ctx],
                                  stdin=DEVNULL, stdout=2).returncode:
                    die("could not build the image from Containerfile (no registry access?). On a machine without a\n"
                        "  registry run the sandbox on the host's own root filesystem instead: AUTORESEARCH_IMAGE=host"
                        " ./run.sh")
        return image

    def containers(self, setup, mode, py, preload):
        """The two steps' podman arguments: the isolation and limits both share, then what each one sees."""
        b, weights = self.handoff_bytes, C_WEIGHTS if self.weights else ""
        base = [*setup, "--network=none", "--cap-drop=all", "--security-opt", "no-new-privileges",
                *(["--user", self.user] if self.user else []), "--read-only", "--read-only-tmpfs=false",
                "--memory", self.memory, "--memory-swap", self.memory, "--pids-limit", self.pids, "--shm-size",
                self.shm, *(["--cpus", self.cpus] if self.cpus else []), "--ulimit", "core=0:0", "--ulimit",
                f"fsize={b}:{b}", "--log-driver", "none",   # podman's own copy of the output: a second, unbounded file
                "--label", "autoresearch=1", "--workdir", C_CODE,
                *(["-v", f"{self.weights}:{C_WEIGHTS}:ro"] if weights else [])]
        base += [arg for k, v in {"HOME": "/tmp", **self.common_env(C_OUT, C_DATA, weights)}.items()
                 for arg in ("-e", f"{k}={v}")]
        # Training sees train.py (copied into WORK/code at its go), meta.json and the train split, and writes to the
        # hand-off tmpfs only.
        self.train_cmd = [*base, "-v", f"{self.work}/code:{C_CODE}:ro", "-v", f"{self.data}/train:{C_DATA}/train:ro",
                          "-v", f"{self.data}/meta.json:{C_DATA}/meta.json:ro", "-v", f"{self.handoff}:{C_OUT}:rw",
                          *mode, py, "-c", LAUNCHER, f"{C_CODE}/train.py", *preload]
        # The evaluation sees the engine, the project and the copied hand-off, which can't hold anything executable.
        # The split is streamed in on stdin rather than mounted: no file in the container holds it, so only the
        # trusted evaluator has it, never the child process that runs the graphs.
        self.eval_cmd = [*base, "-e", "TORCH_FORCE_WEIGHTS_ONLY_LOAD=1", "-e",
                         f"AUTORESEARCH_EVAL_TIMEOUT={self.eval_timeout}", "-e",
                         f"AUTORESEARCH_BATCH_TOLERANCE={setting('AUTORESEARCH_BATCH_TOLERANCE')}",
                         "-v", f"{REPO}/engine:{C_CODE}/engine:ro",
                         "-v", f"{REPO}/prepare_data.py:{C_CODE}/prepare_data.py:ro",
                         "-v", f"{self.run_dir}:{C_OUT}:ro,noexec,nosuid,nodev", *mode,
                         py, *EVALUATE, "--evaluate", C_OUT, "--split", self.split, "--data", "-"]

    # ------------------------------------------------------------------------------------------------------ the data
    def names(self):
        """The project's declarations, read by the evaluator without importing prepare_data.py: the programs train.py
        hands off, and the split's files the evaluator reads."""
        p = subprocess.run([sys.executable, *EVALUATE, "--names", self.split], cwd=REPO, stdin=DEVNULL,
                           stdout=PIPE, text=True, errors="replace")
        if p.returncode:
            die("cannot read the project's declarations in prepare_data.py (the engine's error is above)")
        programs, _, files = p.stdout.partition("\n")
        return programs.split(), files.split()

    def check_data(self):
        for f in ([] if self.test_split else ["meta.json", "train/"]) + self.split_files:   # files, and train/
            path = os.path.join(self.data, f)
            if not (os.path.isdir(path) if f.endswith("/") else os.path.isfile(path)):
                die(f"no data cache in '{self.data}' (no {f.removesuffix('/')} there). Run: python prepare_data.py")

    def prepare_handoff(self):
        """Removes only what a previous run left that we know, so a stale model can't be evaluated as this run's. The
        sandbox never sees the run dir: it writes to a tmpfs owned by the sandbox user, with a size and a file limit,
        so neither the host's disk nor its inodes can fill up."""
        for f in [*self.programs, STATS]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.run_dir, f))
        if not self.sandbox:
            return
        os.mkdir(self.handoff)
        uid, _, gid = self.user.partition(":")
        owner = f",uid={uid},gid={gid}" if self.user else ""
        options = f"size={self.handoff_bytes},nr_inodes={HANDOFF_FILES},mode=0700,noexec,nosuid,nodev{owner}"
        with self.held():
            if subprocess.run(ns(["mount", "-t", "tmpfs", "-o", options, "autoresearch-handoff", self.handoff]),
                              stdin=DEVNULL).returncode:
                die(f"could not mount the hand-off tmpfs on {self.handoff}")
            self.mounted = True

    def copy_out(self):
        """The container and every process in it are gone: nothing writes to the hand-off any more. Copies only the
        expected names that are regular files (find -type f never follows a symlink; FIFOs and devices are not files),
        as new files of the user's with default permissions; find and cp, because a rootless hand-off exists only in
        podman's mount namespace."""
        names = [arg for f in [*self.programs, STATS] for arg in ("-o", "-name", f)][1:]
        if subprocess.run(ns(["find", self.handoff, "-maxdepth", "1", "-type", "f", "(", *names, ")", "-exec", "cp",
                              "--no-preserve=all", "-t", self.run_dir, "--", "{}", "+"]), stdin=DEVNULL).returncode:
            die(f"could not copy the hand-off into {self.run_dir}")

    def unmount(self):
        """Whether the hand-off tmpfs is unmounted now (lazily, if it is busy)."""
        with self.held():
            if self.mounted and (quiet(ns(["umount", self.handoff])) == 0 or
                                 quiet(ns(["umount", "-l", self.handoff])) == 0):
                self.mounted = False
        return not self.mounted

    # ------------------------------------------------------------------------------------------------------ the steps
    # The two steps, training and evaluation, start together, each held at a gate: its input (train.py, the split)
    # reaches it only at its go. Meanwhile the training container's Python imports what train.py imports and the
    # evaluation's loads torch, while the model still writes train.py (--wait) or while train.py trains: about 7 s of
    # every run. A step's time limit counts from its go; conmon's --timeout (`timeout` without a sandbox) is only the
    # backstop. Should run.sh die first, its end of the step's stdin closes: the step gets no go, and exits.
    def launch(self, name, backstop, argv, environ):
        """Starts a step held at its gate, its output (stdout and stderr merged) through its filter on a thread."""
        container = None
        if self.sandbox:
            container = f"autoresearch-{os.getpid()}-{os.urandom(4).hex()}"
            argv = ["podman", "run", "-i", "--name", container, "--timeout", str(backstop), *argv]
        else:   # timeout leads a process group of its own with the step in it; stop() signals it, it passes it on
            argv = ["timeout", "-k", "5", str(backstop), *argv]
        with self.held():
            proc = subprocess.Popen(argv, stdin=PIPE, stdout=PIPE, stderr=STDOUT, bufsize=0, env=environ)
            step = self.steps[name] = Step(name, proc, container)
            step.thread = threading.Thread(target=self.pump, args=(name, proc.stdout), daemon=True)
            step.thread.start()
        with open(f"{self.work}/{name}.pid", "w") as f:   # for the watchdog without a sandbox
            f.write(f"{proc.pid}\n")

    def pump(self, name, f):
        """A step's output thread: train.py's output prefixed; the evaluation's as it is, its reason kept."""
        with f:
            if name == "train":
                prefix_train(f, self.out.write)
            else:
                self.eval_error = eval_reason(f, self.out.write)

    def go(self, name, limit):
        """Opens the step's gate and waits for its end, `limit` seconds at most (its watchdog stops it then). Returns
        (exit code, wall ms, timed out, OOM-killed); exits 2 if podman could not start the container."""
        step, t0 = self.steps[name], time.monotonic()
        stop = ["podman", "rm", "-f", "-t", "0", step.container] if step.container else \
            ["pkill", "-TERM", "-F", f"{self.work}/{name}.pid", "-x", "timeout"]   # SIGKILL to the group 5 s later
        with self.held():
            self.feed(step)
            step.watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG, str(limit), *stop],
                                             stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL, start_new_session=True)
        rc = step.proc.wait()
        rc = 128 - rc if rc < 0 else rc   # killed by a signal: as a shell says it
        step.thread.join()
        wall = ms_since(t0)
        # Killed (non-zero) at or after the limit: that is the timeout, whatever code the kill produced (podman rm -f
        # gives 137 or 255 here, `timeout` 124 or 137; 137 would otherwise look like an OOM kill).
        timed_out = rc != 0 and wall >= limit * 1000 - 500
        state = rc and step.container and output(["podman", "inspect", "--format", "{{.State.OOMKilled}} "
                                                  "{{.State.Status}} {{.State.ExitCode}}", step.container], text=True)
        state = state or "false none"
        self.reap(step)
        # 125-127: podman or the runtime failed before the command ran (no container, or one that never exited with
        # that code itself), a set-up problem rather than the step's failure.
        if step.container and not timed_out and 125 <= rc <= 127 and state.split()[1:] != ["exited", str(rc)]:
            die(f"podman could not start the container (podman exit {rc}, its error is above): check the podman "
                f"set-up\n  (podman info; AUTORESEARCH_PODMAN_ARGS) and, in host mode, that {sys.executable} exists")
        return rc, wall, timed_out, state.startswith("true")

    def feed(self, step):
        """A step's go: train.py read now (with --wait the harness commits it just before), and "go" on its stdin; the
        split, for the evaluation, as a tar stream (tar writes into the pipe itself)."""
        if step.name == "train":
            with contextlib.suppress(OSError), step.proc.stdin:
                shutil.copyfile(os.path.join(REPO, "train.py"), f"{self.work}/code/train.py")
                step.proc.stdin.write(b"go\n")
        else:
            with step.proc.stdin:
                step.feeder = subprocess.Popen(["tar", "-C", self.data, "-cf", "-", *self.split_files],
                                               stdin=DEVNULL, stdout=step.proc.stdin, stderr=DEVNULL)

    def train(self):
        """The training step, the hand-off copied out and checked: a program missing is train.py's failure."""
        rc, self.train_ms, timed_out, oom = self.go("train", self.train_limit)
        if self.mounted and rc == 0:
            self.copy_out()
        if not self.unmount():
            die(f"could not unmount the hand-off tmpfs on {self.handoff}")
        if rc:
            self.verdict("training", rc, timed_out, oom,
                         f"{self.train_limit}s (AUTORESEARCH_TIME_BUDGET={self.budget} + grace {self.grace})")
        for f in self.programs:
            path = os.path.join(self.run_dir, f)
            if not os.path.isfile(path) or os.path.islink(path):
                raise Verdict(Exit.FAILED, f"run.sh: FAILED train.py handed off no {f} (a regular file in "
                              "$AUTORESEARCH_OUT, written with torch.export.save: prepare_data.py's PROGRAMS)")

    def verdict(self, step, rc, timed_out, oom, limit):
        """After a step that failed: the run's verdict. The evaluator's own codes (EVALUATOR): 1 it refused the
        hand-off, 2 the project or the data is broken, 124 it ran out of time."""
        code = EVALUATOR.get(rc, Exit.REFUSED) if step == "evaluation" else Exit.FAILED
        if timed_out or code == Exit.TIMEOUT:
            raise Verdict(Exit.TIMEOUT, f"run.sh: TIMEOUT {step} exceeded its limit of {limit}")
        if oom or rc == 137:
            raise Verdict(Exit.OOM, f"run.sh: OUT OF MEMORY {step} was killed at the memory limit "
                          f"AUTORESEARCH_MEMORY={self.memory}")
        if step == "training":
            raise Verdict(Exit.FAILED, f"run.sh: FAILED train.py exited with code {rc}")
        why = self.eval_error or f"evaluator.py exited with code {rc}"
        if code == Exit.SETUP:
            die(f"the evaluator could not run: {why}")
        if code == Exit.INTERRUPTED:
            raise Verdict(code, f"run.sh: INTERRUPTED the evaluation: {why}")
        raise Verdict(Exit.REFUSED, f"run.sh: REFUSED by the evaluator: {why}")

    # ------------------------------------------------------------------------------------------------------ the end
    def reap(self, step, drain=True):
        """A step that ended: its helpers ended, its container removed, its output drained (unless not `drain`); off
        the record."""
        end(step.watchdog, group=True)
        end(step.feeder)
        if step.container:
            remove_container(step.container)
        if drain:
            step.thread.join()
        step.proc.stdin.close()
        del self.steps[step.name]

    def close(self):
        """Once, with signals ignored: every step stopped at once and reaped, the hand-off unmounted, the work dir
        removed. A step's podman client goes first: a container it is still creating would escape `podman rm`, and be
        left behind; without a sandbox SIGTERM to `timeout`, which passes it on (and kills the group 5 s later). The
        output threads are waited for last: a reader that stops reading (the harness, while it waits for run.sh to
        end) leaves one blocked on a full pipe, and that must not hold up the clean-up."""
        steps = list(self.steps.values())
        for step in steps:
            step.proc.kill() if step.container else step.proc.terminate()
        for step in steps:
            step.proc.wait()
            self.reap(step, drain=False)
        self.unmount()
        if self.work:
            quiet(["rm", "-rf", "--one-file-system", self.work])   # never into a hand-off that failed to unmount
        for step in steps:
            step.thread.join()


if __name__ == "__main__":
    sys.exit(Run().main(sys.argv[1:]))
