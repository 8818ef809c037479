"""Where ./run.sh runs (here, or as a SLURM job), how long it may take, and what it returned."""
import contextlib
import hashlib
import math
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from engine.judge import GRACE_MARGIN, classify_run, last_loss, parse_metrics
from engine.repo import spawn
from engine.settings import EVAL_TIMEOUT, MEMORY_MIN, MEMORY_RESERVE, MEMORY_WAITING, RUN_GRACE, env_int, env_size
from engine.verdicts import Status, SLURM_LOST
from engine.util import HarnessError, RUNNING, TRAIN, data_dir, fmt, live, live_clear, read_text, say, write_text


LOG_MAX_BYTES = 64 << 20          # per experiment log; the metric block is parsed from the in-memory tail


LOG_TAIL_LINES = 60


HARNESS_SLACK = 120                 # the harness's own kill comes this long after run.sh's two limits


def sandbox_image():
    """The image run.sh runs in image mode, None in host mode or without a sandbox: AUTORESEARCH_IMAGE, else the one
    it builds from Containerfile and requirements.txt, tagged by their hash (as run.sh names it)."""
    image = os.environ.get("AUTORESEARCH_IMAGE", "")
    if image == "host" or os.environ.get("AUTORESEARCH_SANDBOX") == "none":
        return None
    if image:
        return image
    try:
        with open("Containerfile", "rb") as a, open("requirements.txt", "rb") as b:
            return "localhost/autoresearch:" + hashlib.sha256(a.read() + b.read()).hexdigest()[:12]
    except FileNotFoundError as e:
        raise HarnessError(f"{e.filename} is missing: run.sh builds the sandbox image from Containerfile and "
                           f"requirements.txt (or export AUTORESEARCH_IMAGE=host)") from None


def check_sandbox(args):
    if os.environ.get("AUTORESEARCH_SANDBOX") == "none":
        say("autoresearch: WARNING: AUTORESEARCH_SANDBOX=none, training runs unsandboxed on this machine")
        return
    if on_slurm(args):
        return   # the compute nodes run podman (slurm_startup checks what a job sees)
    if not shutil.which("podman"):
        raise HarnessError("the sandbox needs podman: install it (apt-get install podman), or set "
                           "AUTORESEARCH_SANDBOX=none to run unsandboxed (unsafe)")
    image = sandbox_image()
    if image and spawn(["podman", "image", "exists", image]).returncode != 0:
        raise HarnessError(f"the sandbox image {image} does not exist: build it once with ./run.sh --build (it needs "
                           f"the network), or, on a machine that cannot pull images, export AUTORESEARCH_IMAGE=host")


@dataclass
class Run:
    """One ./run.sh invocation: its verdict, its trusted block, and val_<METRIC> from it."""
    status: str
    reason: str
    metrics: dict
    value: float
    seconds: float
    log: str
    tail: str


def stop_group(pid, grace=20):
    """Ask run.sh's whole process group to stop (it removes its containers on SIGTERM), then kill."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        t0 = time.time()
        while time.time() - t0 < wait and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            return


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")   # zombies are gone
    except (OSError, IndexError):
        return False


_running = {}                     # label -> pid of each run.sh in flight, mirrored in RUNNING


_running_lock = threading.Lock()  # workers' runs start and end in their own threads


def track_run(label, pid):
    """Note a run in flight (pid) or its end (None) in RUNNING, so that a later start can stop what a harness
    killed with -9 left running. Written whole and renamed into place: a kill never leaves half a line."""
    with _running_lock:
        if pid is None:
            _running.pop(label, None)
        else:
            _running[label] = pid
        if _running:
            write_text(RUNNING, "\n".join(str(p) for p in _running.values()))
        elif os.path.exists(RUNNING):
            os.remove(RUNNING)


def stop_orphan():
    """run.sh processes left behind by a harness that was killed with -9 would race the next runs: stop them."""
    try:
        pids = [int(x) for x in read_text(RUNNING).split()]
    except (OSError, ValueError):
        pids = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                alive = b"run.sh" in f.read()
        except OSError:
            alive = False
        if alive:
            say(f"autoresearch: stopping the run.sh (pid {pid}) left by a killed harness")
            stop_group(pid, 30)
    if os.path.exists(RUNNING):
        os.remove(RUNNING)


def worker_slots(n, gpus, gpu_count, cpu_count):
    """Pure. The environment of each of n workers' runs: with GPUs (AUTORESEARCH_GPUS's ids, or "all"/unset: the
    gpu_count detected) one GPU each; without, an even share of the cpu_count cores each (run.sh: podman --cpus
    and as many threads)."""
    if gpu_count:
        ids = [str(i) for i in range(gpu_count)] if gpus in (None, "", "all") else \
            [g.strip() for g in gpus.split(",") if g.strip()]
        if len(ids) < n:
            raise HarnessError(f"--workers {n} needs a GPU per worker, but there are {len(ids)} "
                               f"(AUTORESEARCH_GPUS={gpus or 'all'}): pass --workers {len(ids)} or fewer")
        return [{"AUTORESEARCH_GPUS": i} for i in ids[:n]]
    return [{"AUTORESEARCH_CPUS": f"{cpu_count / n:.3g}"} for _ in range(n)]


def run_memory(n, host_bytes, environ=os.environ):
    """Pure. The memory limits of each of n runs at once ({AUTORESEARCH_MEMORY, AUTORESEARCH_HANDOFF_SIZE}), so that
    n x (memory + hand-off + MEMORY_WAITING, the evaluation container that holds torch while its run trains) fits in
    the host's memory less MEMORY_RESERVE (at least, or 10%) for the harness, Ollama and the system. Defaults shrink
    to fit (the hand-off to a quarter of a run's share); values the user set are checked as they are."""
    room = host_bytes - max(MEMORY_RESERVE, host_bytes // 10)
    share = room // n - MEMORY_WAITING
    mem, hand = (env_size(k, environ) for k in ("AUTORESEARCH_MEMORY", "AUTORESEARCH_HANDOFF_SIZE"))
    if mem + hand > share and not environ.get("AUTORESEARCH_HANDOFF_SIZE", "").strip():
        hand = min(hand, max(share, 0) // 4)
    if mem + hand > share and not environ.get("AUTORESEARCH_MEMORY", "").strip():
        mem = share - hand
    if mem + hand > share or mem < MEMORY_MIN:
        gib = lambda b: f"{b / 2**30:.3g}g"   # noqa: E731
        raise HarnessError(
            f"{n} run(s) at once need {n} x (AUTORESEARCH_MEMORY {gib(mem)} + AUTORESEARCH_HANDOFF_SIZE {gib(hand)} + "
            f"{gib(MEMORY_WAITING)} for the waiting evaluation), more than this host's {gib(host_bytes)} less "
            f"{gib(host_bytes - room)} kept for the harness and Ollama: " + (
                f"export AUTORESEARCH_MEMORY={gib(share - hand)} or less" if share - hand >= MEMORY_MIN else
                "this host has too little memory") + (" or run fewer --workers" if n > 1 else ""))
    return {"AUTORESEARCH_MEMORY": f"{mem >> 20}m", "AUTORESEARCH_HANDOFF_SIZE": f"{hand >> 20}m"}


def host_memory():
    """Bytes of memory of this machine (MemTotal)."""
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def gpu_count():
    """GPUs the NVIDIA driver sees (none without it): read from /proc, no subprocess."""
    d = "/proc/driver/nvidia/gpus"
    return len(os.listdir(d)) if os.path.isdir(d) else 0


SLURM_FINAL = {"COMPLETED", "FAILED", *SLURM_LOST}


SLURM_OWN_LINE = re.compile(r"(srun|slurmstepd(-\S+)?): ")   # srun's and slurmstepd's messages, not run.sh's


SLURM_GPU_OPTION = re.compile(r"--gres=.*|--gpus(-per-[a-z]+)?=.*|-G.+")


def on_slurm(args):
    return getattr(args, "launcher", "local") == "slurm"


def job_name(tag, label):
    return f"autoresearch-{tag}-{label}"


def slurm_site_args(environ=os.environ):
    """AUTORESEARCH_SLURM_ARGS, the site's options (partition, account, ...): user configuration, never the model's."""
    site = shlex.split(environ.get("AUTORESEARCH_SLURM_ARGS", ""))
    bad = [a for a in site if not a.startswith("-")]
    if bad:
        raise HarnessError(f"AUTORESEARCH_SLURM_ARGS holds {bad[0]!r}, which is not an option: join each value to "
                           f"its option with '=' (e.g. --partition=gpu --account=lab --gres=gpu:a100:1)")
    return site


def srun_argv(site, name, minutes, workdir, command):
    """Pure. One SLURM job running `command`: the site's options first, then the harness's own, which win.
    A GPU request among the site's options (--gres=gpu:a100:1, or --gres=none on a CPU cluster) replaces ours."""
    gpu = [] if any(SLURM_GPU_OPTION.fullmatch(a) for a in site) else ["--gres=gpu:1"]
    return ["srun", *site, f"--job-name={name}", f"--time={minutes}", "--nodes=1", "--ntasks=1",
            f"--chdir={workdir}", "--export=ALL", *gpu, *command]


def run_limit(budget, grace):
    """Seconds after which a run is stopped from outside (by the harness, or SLURM's --time): run.sh's own two
    limits, training (budget + grace) and evaluation, plus slack."""
    return budget + grace + env_int("AUTORESEARCH_EVAL_TIMEOUT", EVAL_TIMEOUT) + HARNESS_SLACK


def launch_argv(args, label, command, grace=RUN_GRACE, cwd="."):
    """The command line of one run in cwd: `command` there, or as a SLURM job allowed the budget plus the allowance."""
    if not on_slurm(args):
        return list(command)
    minutes = math.ceil(run_limit(args.time_budget, grace) / 60)
    return srun_argv(slurm_site_args(), job_name(args.tag, label), minutes, os.path.abspath(cwd), command)


def slurm_jobs(*options):
    """[(job id, state, name, working directory)] of this user's jobs, from squeue."""
    p = spawn(["squeue", "--me", "--noheader", "--format=%i|%T|%j|%Z", *options])
    return [tuple(line.split("|", 3)) for line in p.stdout.split("\n") if line.count("|") >= 3]


def slurm_state(name):
    """(job id, state) of the newest job called `name`, once final; (None, None) if SLURM knows no such job.
    squeue remembers finished jobs for MinJobAge (300 s by default), sacct (where the site keeps accounting) longer."""
    found = (None, None)
    for _ in range(120):   # srun may return while the controller still has the job COMPLETING
        jobs = [(int(j), s) for j, s, _, _ in slurm_jobs("--states=all", f"--name={name}") if j.isdigit()]
        if not jobs:
            p = spawn(["sacct", "--noheader", "--parsable2", "--allocations", "--starttime=now-7days",
                       f"--name={name}", "--format=JobIDRaw,State"])
            jobs = [(int(j), s.split(" ")[0]) for j, _, s in (line.partition("|") for line in p.stdout.split("\n"))
                    if j.isdigit()]
        if jobs:
            found = max(jobs)
            if found[1] in SLURM_FINAL:
                break
        time.sleep(0.25)
    return found


def slurm_verdict(job_id, state, returncode, output, metrics, metric, budget=None, allowance=None):
    """Pure. A job SLURM lost (cancelled, node failure, preemption, its time limit) is recorded with SLURM's state as
    the reason; any other run gets run.sh's own verdict, read without srun's lines after it."""
    if state in SLURM_LOST:
        return SLURM_LOST[state], f"SLURM job {job_id} {state}"
    own = "\n".join(line for line in output.split("\n") if not SLURM_OWN_LINE.match(line))
    if state is None and not own.strip():
        raise HarnessError(f"srun started no job (exit {returncode}): {output.strip()[-500:]}\nCheck "
                           f"AUTORESEARCH_SLURM_ARGS and the cluster (sinfo), then continue with --resume")
    return classify_run(returncode, own, metrics, metric, budget, allowance)


def run_verdict(args, label, returncode, output, metrics, allowance, metric):
    """status, reason of a finished run."""
    if not on_slurm(args):
        return classify_run(returncode, output, metrics, metric, args.time_budget, allowance)
    return slurm_verdict(*slurm_state(job_name(args.tag, label)), returncode, output, metrics, metric,
                         args.time_budget, allowance)


def stop_run(args, label, p):
    """Stop one run: its SLURM job first (run.sh gets SIGTERM there and removes its containers), then srun/run.sh."""
    if on_slurm(args):
        ids = [j for j, _, _, _ in slurm_jobs(f"--name={job_name(args.tag, label)}")]
        if ids:
            spawn(["scancel", *ids])
    stop_group(p.pid)


def slurm_cancel_tag(tag):
    """Cancel this user's live jobs of this tag started from this repository (e.g. left by a killed harness)."""
    here = os.getcwd()
    ids = [j for j, state, name, wd in slurm_jobs() if name.startswith(job_name(tag, "")) and state != "COMPLETING"
           and (wd == here or wd.startswith(here + "/"))]
    if ids:
        say(f"autoresearch: cancelling SLURM job(s) {', '.join(ids)} of tag {tag}")
        spawn(["scancel", *ids])


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def slurm_startup(args):
    """--launcher slurm: the client commands exist, jobs left by a killed harness are cancelled (--resume), and a job
    asking for what every run asks for sees this repository, run.sh and the data at the same paths, same content."""
    missing = [c for c in ("srun", "squeue", "scancel") if not shutil.which(c)]
    if missing:
        raise HarnessError(f"--launcher slurm needs the SLURM commands srun, squeue and scancel ({', '.join(missing)} "
                           f"not found): run autoresearch on a submit (login) node of the cluster")
    if args.resume:
        slurm_cancel_tag(args.tag)
    os.makedirs("runs", exist_ok=True)
    token = f"runs/.slurm-check-{secrets.token_hex(8)}"   # new content: a stale copy of the tree cannot have it
    write_text(token, secrets.token_hex(16))
    paths = [os.path.abspath(f) for f in ("run.sh", "engine/sandbox.py", "engine/verdicts.py", "engine/evaluator.py",
                                          TRAIN, "prepare_data.py", os.path.join(data_dir(), "meta.json"), token)]
    say("autoresearch: checking that a SLURM job sees this repository and the data (one short job)")
    try:
        p = spawn(launch_argv(args, "check", ["sha256sum", "--", *paths]), stdin=subprocess.DEVNULL)
        seen = {m.group(2): m.group(1) for m in re.finditer(r"^([0-9a-f]{64})  (.+)$", p.stdout, re.M)}
        wrong = [f for f in paths if seen.get(f) != sha256_file(f)]
    finally:
        os.remove(token)
    if wrong and not seen:
        raise HarnessError(f"the SLURM start-up job failed (srun exit {p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-800:]}\nCheck AUTORESEARCH_SLURM_ARGS (partition, "
                           f"account; --gres=none on a cluster without GPUs) and the cluster (sinfo)")
    if wrong:
        raise HarnessError(f"a SLURM job does not see {wrong[0]} as this machine does "
                           f"({'different content' if wrong[0] in seen else 'missing'}): --launcher slurm needs "
                           f"the repository, the data ({data_dir()}) and the weights on a filesystem shared with the "
                           f"compute nodes, at the same paths (README: SLURM)")


def run_grace(allowance):
    """run.sh's AUTORESEARCH_GRACE: the user's, else a candidate's allowance plus a margin, else run.sh's default."""
    return env_int("AUTORESEARCH_GRACE", RUN_GRACE if allowance is None else math.ceil(allowance) + GRACE_MARGIN)


def start_run(args, label, run_dir, seed, allowance=None, cwd=".", slot=None, wait=False):
    """./run.sh in its own process group, its output on a pipe. A worker's run: ./run.sh of its worktree (cwd) in its
    slot (env). wait=True (`./run.sh --wait`; Loop.prestart): its containers start now and load torch while the
    model still writes train.py; run_sandbox(started=) says go once train.py is committed, cancel_run drops it."""
    os.makedirs(os.path.dirname(RUNNING), exist_ok=True)
    grace = run_grace(allowance)
    env = dict(os.environ, AUTORESEARCH_TIME_BUDGET=str(args.time_budget), AUTORESEARCH_GRACE=str(grace),
               AUTORESEARCH_RUN_DIR=os.path.abspath(run_dir), AUTORESEARCH_SEED=str(seed), **(slot or {}))
    if cwd != ".":   # run.sh finds the data and the weights relative to itself
        env.update(AUTORESEARCH_DATA=os.path.abspath(data_dir()),
                   AUTORESEARCH_WEIGHTS=os.path.abspath(os.environ.get("AUTORESEARCH_WEIGHTS") or "weights"))
    p = spawn(launch_argv(args, label, ["./run.sh", "--wait"] if wait else ["./run.sh"], grace, cwd), wait=False,
              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
              stdin=subprocess.PIPE if wait else subprocess.DEVNULL, start_new_session=True, cwd=cwd)
    track_run(label, p.pid)   # lets a later start stop this run if we get kill -9'd
    return p


def cancel_run(label, p):
    """Drop a run started with wait=True that never got its go."""
    if p is not None:
        stop_group(p.pid)
        p.wait()
        for f in (p.stdin, p.stdout):
            f.close()
        track_run(label, None)


class Log:
    """A run's output on its way to logs/<label>.log: at most LOG_MAX_BYTES of it (a train.py that prints without end
    must not fill the disk; the last 256 KiB follow at the end), its tail kept in memory (the trusted block sits at the
    very end), and the last loss it printed, for the live line."""
    def __init__(self, f):
        self.f, self.tail, self.buf, self.logged, self.loss = f, b"", b"", 0, "-"

    def add(self, chunk):
        if self.logged < LOG_MAX_BYTES:
            self.f.write(chunk[:LOG_MAX_BYTES - self.logged])
        self.logged += len(chunk)
        self.tail = (self.tail + chunk)[-262144:]
        *done, self.buf = (self.buf + chunk)[-8192:].split(b"\n")
        self.loss = next((v for v in map(last_loss, (x.decode("utf-8", "replace") for x in reversed(done))) if v),
                         self.loss)

    def close(self):
        if self.logged > LOG_MAX_BYTES:
            self.f.write(b"\n[autoresearch: log cut at %d MiB; its last 256 KiB follow]\n" % (LOG_MAX_BYTES >> 20)
                         + self.tail)


def watch(args, label, p, log, limit, cancel, phase_short):
    """Streams run.sh's output into the log until it ends; stops it past `limit` seconds or once `cancel` is set.
    Returns (None, or how it was stopped: timeout, interrupted; seconds)."""
    t0, fd = time.time(), p.stdout.fileno()
    while True:
        elapsed = time.time() - t0
        if elapsed > limit or cancel is not None and cancel.is_set():
            stop_run(args, label, p)
            return (Status.TIMEOUT if elapsed > limit else Status.INTERRUPTED), elapsed
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return None, elapsed
            log.add(chunk)
        live(f"exp {label} | {phase_short} | {elapsed:.0f}/{args.time_budget}s | loss {log.loss}")


def run_sandbox(args, label, run_dir, seed, phase_short, metric, allowance=None, cwd=".", slot=None, cancel=None,
                started=None):
    """One run (start_run, or the one `started` waiting for its go) with a hard wall-clock limit; output streams to
    logs/<label>.log. With an allowance (candidates), a run over the budget + allowance is invalid and run.sh kills it
    soon after. A worker's run is stopped as interrupted once cancel is set; logs/ and runs/ stay in this checkout."""
    os.makedirs("logs", exist_ok=True)
    log_path = f"logs/{label}.log"
    # under SLURM the job's --time bounds the run, and time spent queueing is not the run's
    limit = math.inf if on_slurm(args) else run_limit(args.time_budget, run_grace(allowance))
    plain = not sys.stdout.isatty()   # nohup, tee, a log file: a line at each start and end instead of the live line
    with open(log_path, "wb", buffering=0) as f:   # unbuffered: users (and tests) tail -f it
        p, log = started or start_run(args, label, run_dir, seed, allowance, cwd, slot), Log(f)
        if plain:
            say(f"autoresearch: run {label} started (seed {seed}, {args.time_budget}s budget; log {log_path})")
        try:
            if started:
                with contextlib.suppress(BrokenPipeError):   # run.sh is gone: its own last line says why
                    p.stdin.write(b"go\n")
                    p.stdin.close()
            stopped, seconds = watch(args, label, p, log, limit, cancel, phase_short)
            p.wait()
            log.close()
        except BaseException:
            stop_run(args, label, p)   # Ctrl-C: stop the containers before anything else
            raise
        finally:
            p.stdout.close()
            track_run(label, None)
    live_clear()
    run = verdict(args, label, p.returncode, log, stopped, limit, allowance, metric, seconds)
    if plain:
        say(f"autoresearch: run {label} ended after {run.seconds:.0f}s: {run.status}" +
            (f", {metric.column} {fmt(run.value)}" if run.value is not None else f" ({run.reason})"))
    return run


def verdict(args, label, returncode, log, stopped, limit, allowance, metric, seconds):
    """The Run of a finished run.sh; a set-up error stops the loop (not the candidate's fault)."""
    out, log_path = log.tail.decode("utf-8", "replace"), f"logs/{label}.log"
    metrics = parse_metrics(out)
    if stopped:
        status, reason = stopped, (f"harness wall-clock limit {limit}s exceeded" if stopped == Status.TIMEOUT else
                                   "stopped: its round was interrupted")
    else:
        status, reason = run_verdict(args, label, returncode, out, metrics, allowance, metric)
        if status == "setup":
            raise HarnessError(f"./run.sh could not run the sandbox: {reason} (full output: {log_path}). "
                               f"Fix the set-up, then continue with --resume.")
    if status in (Status.CRASH, Status.TIMEOUT, Status.INVALID):
        reason = f"{reason}; log: {log_path}"
    lines = [line for line in out.split("\n") if line.strip()]
    return Run(status, reason, metrics, metrics.get(metric.column), seconds, log_path,
               "\n".join(lines[-LOG_TAIL_LINES:]))
