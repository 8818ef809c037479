"""A real one-node SLURM cluster on loopback, for tests: munged, slurmctld and slurmd started as root.

Everything lives in one temp directory (config, state, spool, logs, pid files); every address is 127.0.0.1
(`SlurmctldHost=HOST(127.0.0.1)`, `NodeAddr=127.0.0.1`), so no test traffic reaches the host's other addresses
even where the hostname resolves to one. Clients find the cluster through SLURM_CONF.

    python tests/slurm_cluster.py DIR    starts one by hand (Ctrl-C stops it) and prints the SLURM_CONF to export
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

CONF = """\
ClusterName=autoresearch-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={mem_per_cpu}
ReturnToService=2
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterError(Exception):
    """The cluster could not start; the message carries the reason from the daemons' logs."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def munge_ok():
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


MUNGED_PID = "/run/munge/munged.pid"


def start_munge():
    """Reuse a running munged (True if we started one)."""
    if munge_ok():
        return False
    os.makedirs("/run/munge", exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    p = subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], capture_output=True, text=True)
    for _ in range(50):
        if munge_ok():
            return True
        time.sleep(0.1)
    raise ClusterError(f"munged did not start (exit {p.returncode}): {(p.stderr or p.stdout).strip()}")


class Cluster:
    def __init__(self, base, slurmd_prefix=()):
        self.dir = str(base)
        self.slurmd_prefix = list(slurmd_prefix)   # e.g. a mount namespace that hides a path from the jobs
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.jobcomp = os.path.join(self.dir, "log", "jobcomp.txt")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pid_files = [os.path.join(self.dir, f"{d}.pid") for d in ("slurmd", "slurmctld")]

    def log(self, daemon):
        path = os.path.join(self.dir, "log", f"{daemon}.log")
        return open(path).read() if os.path.exists(path) else ""

    def reason(self, what):
        tails = "\n".join(f"--- {d}.log (tail)\n" + "\n".join(self.log(d).splitlines()[-15:])
                          for d in ("slurmctld", "slurmd"))
        return f"{what}\n{tails}"

    def start(self):
        for exe in ("munge", "slurmctld", "slurmd", "srun"):
            if not shutil.which(exe):
                raise ClusterError(f"{exe} is not installed: apt-get install -y slurm-wlm munge")
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        mem_mib = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal:"))) // 1024
        cpus = os.cpu_count()
        mem = mem_mib - min(2048, mem_mib // 8)          # headroom for the OS
        with open(self.conf, "w") as f:
            f.write(CONF.format(host=self.host, ctld_port=free_port(), d_port=free_port(), d=self.dir, cpus=cpus,
                                mem=mem, mem_per_cpu=max(256, mem // (4 * cpus))))
        if start_munge():
            self.pid_files.append(MUNGED_PID)
        for daemon in ("slurmctld", "slurmd"):
            prefix = self.slurmd_prefix if daemon == "slurmd" else []
            p = subprocess.run([*prefix, daemon, "-f", self.conf], env=self.env, capture_output=True, text=True)
            if p.returncode != 0:
                raise ClusterError(self.reason(f"{daemon} exited {p.returncode}: {(p.stderr or p.stdout).strip()}"))
        t0 = time.time()
        while time.time() - t0 < 30:
            s = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if s.stdout.strip() == "idle":
                return self
            time.sleep(0.2)
        raise ClusterError(self.reason(f"the node did not become idle within 30 s (sinfo: {s.stdout.strip()} "
                                       f"{s.stderr.strip()})"))

    def squeue(self, *args):
        return subprocess.run(["squeue", "-h", *args], env=self.env, capture_output=True, text=True).stdout

    def stop(self):
        """Cancel what is left, then stop the daemons (and a munged we started) by their pid files."""
        subprocess.run(["scancel", "--partition=debug"], env=self.env, capture_output=True)
        t0 = time.time()
        while time.time() - t0 < 40 and self.squeue():   # KillWait (30 s) bounds how long a cancel takes
            time.sleep(0.2)
        for pid_file in self.pid_files:
            try:
                pid = int(open(pid_file).read().strip())
            except (OSError, ValueError):
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                t0 = time.time()
                while time.time() - t0 < wait and os.path.exists(f"/proc/{pid}"):
                    time.sleep(0.1)


if __name__ == "__main__":
    c = Cluster(os.path.abspath(sys.argv[1])).start()
    print(f"export SLURM_CONF={c.conf}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # kill PID stops it too (SIGINT may be ignored)
    try:
        signal.pause()
    except KeyboardInterrupt:
        c.stop()
