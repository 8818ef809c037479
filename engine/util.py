"""Small helpers every module shares: the one file writer, terminal output, numbers and text for people."""
import math
import os
import re
import shutil
import sys
import threading


RESULTS = "results.tsv"


RUNNING = "runs/.running"         # pids of the run.sh in flight (their process group ids), one per line


WORKTREES = ".worktrees"          # --workers N: worker k's git worktree is .worktrees/w<k>


PROGRAM = "program.md"


SCRATCHPAD = "scratchpad.md"


TRAIN = "train.py"


TMP = ".tmp"                      # write_text's file beside the one it replaces (a kill -9 may leave it)


OUR_OUTPUTS = ("results.tsv", "progress.png", "logs/", "runs/", ".worktrees/",  # never make the tree "dirty"
               "results-", "compare.png", "test_scores")          # (results-TAG.tsv: archived runs)


TEST_SCORES = "test_scores.tsv"   # test_<METRIC> of each commit evaluated on the test split


class HarnessError(Exception):
    """A problem the user can fix; printed as one clear message, never a traceback."""


def clean_text(s, limit=300):
    """One line, no tabs, encodable (a lone surrogate becomes '?'): safe for a TSV cell and a commit message."""
    return encodable(re.sub(r"\s+", " ", "" if s is None else str(s)).strip())[:limit]


def encodable(obj):
    """Pure. obj with every string made encodable as UTF-8 (a lone surrogate becomes '?'), in dicts and lists."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, dict):
        return {k: encodable(v) for k, v in obj.items()}
    return [encodable(v) for v in obj] if isinstance(obj, list) else obj


def fmt(v):
    """For people (the prompt, the terminal, the plot): 4 significant digits. results.tsv holds values exactly."""
    return "" if v is None or v == "" else f"{float(v):.4g}" if isinstance(v, (int, float)) else str(v)


def num(v):
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def say(msg):
    live_clear()
    print(msg, flush=True)


_live = {"on": False}


def live(line):
    if sys.stderr.isatty() and threading.current_thread() is threading.main_thread():   # not the workers' runs
        cols = shutil.get_terminal_size((100, 20)).columns
        sys.stderr.write("\r\033[K" + line[:cols - 1])
        sys.stderr.flush()
        _live["on"] = True


def live_clear():
    if _live["on"]:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
        _live["on"] = False


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def write_text(path, text):
    """The one way the harness writes a file (text, or bytes): whole, or not at all. Encoded first (a lone surrogate
    raises here, before anything is touched), written to PATH.tmp beside it, fsync'd and renamed over it, so that a
    crash or kill -9 leaves the old file or the new one, never half of either (nor an empty train.py)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    with open(path + TMP, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + TMP, path)


def data_dir():
    return os.environ.get("AUTORESEARCH_DATA") or "data"
