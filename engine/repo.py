"""git: the allowlist every subprocess goes through, the one-loop-per-repository lock, workers' worktrees."""
import fcntl
import os
import shutil
import subprocess

from engine.util import HarnessError, OUR_OUTPUTS, TMP, WORKTREES


GIT_SUBCOMMANDS = {"rev-parse", "status", "add", "commit", "reset", "checkout", "log", "config", "show", "worktree"}


def check_argv(argv):
    """Pure. None if argv may run, else the reason. Argument lists only, never a shell string."""
    if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(a, str) for a in argv):
        return "commands must be non-empty argument lists of strings"
    prog = argv[0]
    if prog == "git":
        if len(argv) < 2 or argv[1] not in GIT_SUBCOMMANDS:
            return f"git subcommand not allowed: {argv[1:2]}"
        return None
    if prog == "./run.sh" or argv[:3] == ["podman", "image", "exists"] and len(argv) == 4:
        return None
    if prog == "srun":
        # options only (values joined by '='), then exactly ./run.sh [--test DIR] or the start-up probe
        i = next((k for k, a in enumerate(argv) if k and not a.startswith("-")), len(argv))
        cmd = list(argv[i:])
        run_sh = cmd == ["./run.sh"] or len(cmd) == 3 and cmd[:2] == ["./run.sh", "--test"]
        if run_sh or cmd[:2] == ["sha256sum", "--"]:
            return None
        return f"{prog} may only run ./run.sh or the start-up probe, not {cmd[:2]}"
    if prog in ("scancel", "squeue", "sacct"):
        if all(a.startswith("-") or a.isdigit() for a in argv[1:]):
            return None
        return f"{prog} takes options and job ids only"
    if list(argv) == ["ollama", "serve"]:
        return None
    return f"command not allowed: {prog}"


def spawn(argv, *, wait=True, **kw):
    """Run an allowlisted command (shell=False always). wait=True returns CompletedProcess."""
    why = check_argv(argv)
    if why:
        raise PermissionError(why)
    kw.pop("shell", None)
    if wait:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(list(argv), shell=False, **kw)
    return subprocess.Popen(list(argv), shell=False, **kw)


def git(*args, check=True, cwd=None):
    p = spawn(["git", *args], cwd=cwd)
    if check and p.returncode != 0:
        raise HarnessError(f"git {' '.join(args[:2])} failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout.strip()


def dirty_files(cwd="."):
    p = spawn(["git", "status", "--porcelain", "--untracked-files=all"], cwd=cwd)   # not git(): it strips column 1
    if p.returncode != 0:
        raise HarnessError(f"git status failed: {p.stderr.strip()}")
    files = [line[3:].strip().strip('"') for line in p.stdout.split("\n") if line.strip()]
    return [f for f in files if not f.startswith(OUR_OUTPUTS) and not f.endswith(TMP)]


def lock_repo():
    """One loop per repository: an exclusive flock on .git/autoresearch.lock (shared by the workers' worktrees), taken
    before anything looks at runs, rows or the branch; a second instance stops with the holder's pid and changes
    nothing. The lock goes with this process, however it ends (kill -9 included): run.sh does not inherit it."""
    common = git("rev-parse", "--path-format=absolute", "--git-common-dir", check=False)
    if not common or git("rev-parse", "--is-inside-work-tree", check=False) != "true":
        raise HarnessError("not inside a git repository: run autoresearch from the project's git checkout "
                           "(git init && git add -A && git commit -m init)")
    fd = os.open(os.path.join(common, "autoresearch.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise HarnessError(f"another autoresearch (pid {pid}) is running in this repository: wait for it to end, "
                           f"or stop it (kill {pid}; it cleans up), then start again") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def worktree(k, commit):
    """Worker k's worktree (.worktrees/w<k>), checked out clean at commit (detached: the branch stays the main
    checkout's). Reused across rounds; a stale folder (e.g. left by a kill -9) is replaced."""
    path = os.path.join(WORKTREES, f"w{k}")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, ".git")):
        git("reset", "-q", "--hard", commit, cwd=path)
    else:
        shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune")
        git("worktree", "add", "-q", "--detach", path, commit)
    return path


def sweep_worktrees():
    """Remove every worker worktree (at start-up, on --resume and when the loop ends, normally or not): a round
    always starts from fresh ones, so whatever is left is an orphan. git forgets those whose folder is gone."""
    shutil.rmtree(WORKTREES, ignore_errors=True)
    git("worktree", "prune")


def current_tag():
    branch = git("rev-parse", "--abbrev-ref", "HEAD", check=False)
    return branch.split("/", 1)[1] if branch.startswith("autoresearch/") else None


def git_identity():
    """Commits need an identity; fall back to a neutral one only where none is configured."""
    if not git("config", "user.email", check=False):
        for k in ("GIT_AUTHOR", "GIT_COMMITTER"):
            os.environ.setdefault(f"{k}_NAME", "autoresearch")
            os.environ.setdefault(f"{k}_EMAIL", "autoresearch@localhost")
