#!/usr/bin/env python3
"""autoresearch: an offline research loop driven by a local Ollama model.

    python autoresearch.py [--model M] [--tag NAME] [--max-experiments N] [--resume] [--agent A] ...
    python autoresearch.py report [--test | --compare TAG [TAG ...]]

Each experiment: the model reads train.py + scratchpad.md + recent results, makes ONE change through
three tools (read_file, edit_file, run_experiment), the harness trains it in the sandbox (./run.sh),
reads the metric from the trusted evaluation block, and keeps the commit only if the improvement is
larger than the measured run-to-run noise. Otherwise git goes back to the best commit. A candidate's run starts
with the conversation (./run.sh --wait, start_run): its containers load torch while the model works, and it trains
the train.py committed at run_experiment (run_sandbox says go). However it ends (kept,
discarded, crashed, interrupted, ...), an experiment is one Outcome, which Loop.conclude turns into that git step
and one results row (make_row).

Files: branch autoresearch/<tag> holds the baseline, every kept experiment (one commit each, with a structured
message) and scratchpad-only commits; results.tsv (untracked, append-only, fsync'd) has one row per experiment,
its values exact, read back only by --resume (and `report`); logs/<exp>.log (and logs/<exp>-s2.log for a second
seed) is the full run.sh output; runs/<exp>/ is the model hand-off, kept only for the baseline and the current best
(for `report --test`); progress.png is redrawn after every experiment.

The metric is the project's: prepare_data.py declares METRIC (its evaluation prints val_<METRIC>) and DIRECTION
(minimize or maximize) as two literal lines, read with ast by the engine (project_metric); nothing else names it.

Keep rule (noise-aware): the baseline runs --noise-runs times with seeds 1..K; sigma is the pooled standard
deviation of all repeated runs (baseline + each keep, which is re-run once with seed 2). A candidate (seed 1)
is kept iff its improvement over the best (best - mean when minimizing, mean - best when maximizing) is more than
max(z * sigma / sqrt(n), floor * |best|) over its n runs; the new best is that mean. --confirm instead asks a second
seed to agree.

Agents: --agent llm (the default) is the model above. --agent optuna (TPE) and --agent random are classic
search baselines in the same loop: each proposes values for train.py's numeric constants (the search space:
program.md's `## Search space` block, else derived from train.py's active preset, see derived_space), written into
train.py as an ordinary edit; commit, sandbox, keep rule, results.tsv (column `agent`) and branch are the same.
`report --compare` draws several runs on the same axes (compare.png) with a table.

Workers: --workers N (Loop.round) runs rounds of N experiments from the same best commit, each in its own git
worktree (.worktrees/w<k>) and slot (a GPU, or a share of the cores), trained in threads while the model talks to the
next worker; the round keeps at most one, judged with the z for the best of N (sidak_z, decide_round), and merges
every worker's notes (merge_scratchpads). runs/.running lists every run.sh in flight, so a start after kill -9 stops
them all. --workers 1 is the loop above, unchanged (Loop.experiment).

The model acts only through the three tools: read_file and edit_file (Loop.tool_read, Loop.tool_edit), and
run_experiment, which Loop.converse handles itself (it ends the turn). Every subprocess goes through `spawn`, an
allowlist of fixed argument lists. Parsing, editing, deciding and prompt building are pure functions (tested in
tests/test_autoresearch.py); those with a `metric=None` parameter then read the project's (project_metric).
"""
import argparse
import ast
import datetime
import difflib
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

# qwen2.5-coder:7b: ~4.7 GB quantized, so it fits next to a 15 GB training run on a 24 GB GPU, it is
# trained for tool calling, and it answers a ~6K-token prompt in seconds. Bigger models can be passed.
DEFAULT_MODEL = "qwen2.5-coder:7b"
DEFAULT_HOST = "http://127.0.0.1:11434"
RESULTS = "results.tsv"
RUNNING = "runs/.running"         # pids of the run.sh in flight (their process group ids), one per line
WORKTREES = ".worktrees"          # --workers N: worker k's git worktree is .worktrees/w<k>
PROGRAM = "program.md"
SCRATCHPAD = "scratchpad.md"
TRAIN = "train.py"
# results.tsv's columns after the contract's six (experiment commit val_<METRIC> delta status description)
MORE_COLUMNS = ["runs", "best", "sigma", "threshold", "reason", "phase", "best_commit", "model_seconds", "run_seconds",
                "wall_seconds", "prompt_tokens", "finished", "agent", "train_wall_seconds", "round", "worker",
                "time_budget"]
TEXT_COLUMNS = {"commit", "status", "description", "reason", "phase", "best_commit", "finished", "agent"}
INT_COLUMNS = {"experiment", "prompt_tokens", "round", "worker", "time_budget"}
STATUSES = ("baseline", "keep", "discard", "crash", "timeout", "invalid", "interrupted")
READABLE = {TRAIN, PROGRAM, SCRATCHPAD, RESULTS}       # + the last run's log, added at run time
EDITABLE = {TRAIN, SCRATCHPAD}
TMP = ".tmp"                      # write_text's file beside the one it replaces (a kill -9 may leave it)
OUR_OUTPUTS = ("results.tsv", "progress.png", "logs/", "runs/", ".worktrees/",  # never make the tree "dirty"
               "results-", "compare.png", "test_scores")          # (results-TAG.tsv: archived runs)
TEST_SCORES = "test_scores.tsv"   # test_<METRIC> of each commit evaluated on the test split
SCRATCHPAD_MAX_CHARS = 4000       # the agent must condense its notes beyond this
READ_MAX_CHARS = 20000
LOG_MAX_BYTES = 64 << 20          # per experiment log; the metric block is parsed from the in-memory tail
LOG_TAIL_LINES = 60
TOOL_RESULT_MAX = 8000
# The time budget is the harness's: run.sh times the training container itself (train_wall_seconds), from its go to
# its exit. A candidate may run past the budget by a fixed allowance for start-up, data loading and export:
# ALLOWANCE_SHARE of the budget, at least ALLOWANCE_MIN seconds. Nothing measured widens it (a baseline slowed by a busy
# machine once bought candidates several times the budget); beyond it a run is invalid, and GRACE_MARGIN seconds later
# run.sh kills it (AUTORESEARCH_GRACE, unless the user set it). The baseline is the user's own train.py: it gets
# run.sh's generous default grace, and a warning where its own overhead would not fit the allowance.
ALLOWANCE_SHARE = 0.10
ALLOWANCE_MIN = 30.0
GRACE_MARGIN = 10
DEFAULT_BUDGET = 300               # training seconds per run (run.sh's default for AUTORESEARCH_TIME_BUDGET too)
RUN_GRACE, EVAL_TIMEOUT = 120, 600  # run.sh's defaults for AUTORESEARCH_GRACE and AUTORESEARCH_EVAL_TIMEOUT
MEMORY_RESERVE = 2 << 30          # host memory kept for the harness, Ollama and the system (or 10%, if more)
MEMORY_WAITING = 512 << 20        # what an evaluation container holds while its run trains (torch loaded)
MEMORY_MIN = 256 << 20            # less than this per run trains nothing
SIZES = {"AUTORESEARCH_MEMORY": "16g", "AUTORESEARCH_HANDOFF_SIZE": "2g", "AUTORESEARCH_SHM_SIZE": "2g"}   # run.sh's
HARNESS_SLACK = 120                 # the harness's own kill comes this long after run.sh's two limits
TOKEN_RESERVE = 0.25              # share of num_ctx left for tool results and the answer
CHARS_PER_TOKEN = 3.0             # for train.py's size limit: below what code tokenizes to (about 3.5)
PROMPT_OTHER_CHARS = 3000          # the least the first prompt holds beside train.py and the system prompt: the tool
                                   # schemas (about 1.1K), the framing, and user_message's tightest cut of the
                                   # results (2) and the notes (600 characters)


class HarnessError(Exception):
    """A problem the user can fix; printed as one clear message, never a traceback."""


# ----------------------------------------------------------------------------------------------
# The project's metric, declared once in its prepare_data.py.

class Metric(NamedTuple):
    name: str           # the evaluation prints val_<name> (test_<name> on the test split)
    direction: str      # minimize | maximize

    @property
    def column(self):
        return f"val_{self.name}"

    @property
    def better(self):
        return "lower" if self.direction == "minimize" else "higher"

    @property
    def columns(self):
        return ["experiment", "commit", self.column, "delta", "status", "description", *MORE_COLUMNS]

    def gain(self, value, best):
        """How much value improves on best (negative: worse)."""
        return best - value if self.direction == "minimize" else value - best


def project_metric(root="."):
    """The (name, direction) that <root>/prepare_data.py declares as literal top-level lines, METRIC = "..." and
    DIRECTION = "minimize" | "maximize", read by the engine (evaluator.project_constants) with ast, never imported: no
    torch in the harness, nothing of train.py. Pure functions that take `metric=None` use this one, the project in the
    current directory."""
    path = os.path.join(root, "prepare_data.py")
    try:
        return _declared_metric(path, read_text(path))
    except OSError:
        raise HarnessError(f"{path} is missing: the project declares its metric there (METRIC, DIRECTION)") from None


@functools.lru_cache(maxsize=8)   # parsing takes ~15 ms; pure functions given no metric ask for it on every call
def _declared_metric(path, text):
    import evaluator   # the engine, beside this file; only a project needs it
    try:
        c = evaluator.project_constants(path, ("METRIC", "DIRECTION"), text)
    except evaluator.SetupError as e:
        raise HarnessError(str(e)) from None
    return Metric(c["METRIC"], c["DIRECTION"])


# ----------------------------------------------------------------------------------------------
# The allowlist: one function through which every subprocess goes.

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
    if prog in ("srun", "sbatch"):
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


def check_path(root, path, allowed):
    """Resolve a path the model named. Returns (relative_path, None) or (None, error)."""
    if not isinstance(path, str) or not path.strip():
        return None, "path must be a non-empty string"
    p = path.strip().replace("\\", "/")
    if p.startswith("/") or p.startswith("~") or re.match(r"^[A-Za-z]:", p):
        return None, f"absolute paths are not allowed: {path!r}"
    parts = p.split("/")
    if ".." in parts:
        return None, f"'..' is not allowed: {path!r}"
    rel = "/".join(x for x in parts if x not in ("", "."))
    if rel not in allowed:
        return None, f"{rel!r} is not allowed here; allowed: {', '.join(sorted(allowed))}"
    root_real = os.path.realpath(root)
    if os.path.realpath(os.path.join(root, rel)) != os.path.join(root_real, rel):
        return None, f"{rel!r} is a symlink leading elsewhere; not allowed"
    return rel, None


# ----------------------------------------------------------------------------------------------
# Pure functions: parsing model replies and run output, editing, deciding, phases, prompts.

TOOL_NAMES = ("read_file", "edit_file", "run_experiment")
TOOLS = [
    {"type": "function", "function": {
        "name": "read_file",
        "description": "Read a file: train.py, program.md, scratchpad.md, results.tsv, or the last run's log.",
        "parameters": {"type": "object", "required": ["path"],
                       "properties": {"path": {"type": "string", "description": "relative path"}}}}},
    {"type": "function", "function": {
        "name": "edit_file",
        "description": "Replace old_text by new_text in train.py or scratchpad.md. old_text must occur "
                       "exactly once; copy it exactly, including indentation.",
        "parameters": {"type": "object", "required": ["path", "old_text", "new_text"],
                       "properties": {"path": {"type": "string"}, "old_text": {"type": "string"},
                                      "new_text": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "run_experiment",
        "description": "Finish editing and run the experiment. description = your one-sentence hypothesis.",
        "parameters": {"type": "object", "required": ["description"],
                       "properties": {"description": {"type": "string"}}}}},
]


def _as_call(obj):
    """Recognize the shapes local models use for a tool call written as JSON."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        return _as_call(obj["function"])
    for key in ("tool_call", "tool", "call"):
        if isinstance(obj.get(key), dict):
            return _as_call(obj[key])
    name = next((obj[k] for k in ("name", "tool", "function", "tool_name") if isinstance(obj.get(k), str)), None)
    if name not in TOOL_NAMES:
        return None
    args = next((obj[k] for k in ("arguments", "parameters", "args", "input") if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False)
        except ValueError:
            return None
    return (name, args) if isinstance(args, dict) else None


def parse_tool_calls(content, tool_calls=None):
    """Tool calls from a reply: native tool_calls first, else JSON objects written in the content."""
    calls = []
    for tc in tool_calls or []:
        fn = tc.get("function", tc) if isinstance(tc, dict) else None
        c = _as_call(fn) if fn is not None else None
        if c:
            calls.append(c)
    if calls or not content:
        return calls
    dec = json.JSONDecoder(strict=False)  # models put raw newlines inside JSON strings
    i = 0
    while True:
        starts = [j for j in (content.find("{", i), content.find("[", i)) if j != -1]
        if not starts:
            break
        i = min(starts)
        try:
            obj, end = dec.raw_decode(content, i)
        except ValueError:
            i += 1
            continue
        found = [c for c in (_as_call(o) for o in (obj if isinstance(obj, list) else [obj])) if c]
        calls += found
        i = end if found else i + 1
    return calls


METRIC_LINE = re.compile(r"([a-z][a-z0-9_]*): (-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)")
EVAL_MARKER = "--- trusted evaluation ---"


def parse_metrics(output):
    """Metrics from run.sh output: only unprefixed `key: number` lines after the one trusted marker.

    Split on "\\n" only: str.splitlines() would also split on \\r, \\x0b, \\x1c.., letting a train.py line
    (prefixed `train| `) smuggle a fake unprefixed line. run.sh prints the marker once and the evaluator each
    key once, so a second marker or a repeated key means something forged output: no metric at all."""
    lines = output.split("\n")
    marks = [i for i, line in enumerate(lines) if line == EVAL_MARKER]
    if len(marks) != 1:
        return {}
    metrics = {}
    for line in lines[marks[0] + 1:]:
        m = METRIC_LINE.fullmatch(line)
        if m:
            v = float(m.group(2))
            if m.group(1) in metrics or not math.isfinite(v):
                return {}
            metrics[m.group(1)] = v
    return metrics


LOSS = re.compile(r"\bloss[\s=:]+(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def last_loss(line):
    m = LOSS.search(line) if line.startswith("train| ") else None
    return m.group(1) if m else None


def budget_allowance(budget):
    """Pure. Seconds a candidate's training container may run past the budget: max(ALLOWANCE_SHARE x budget,
    ALLOWANCE_MIN)."""
    return max(ALLOWANCE_SHARE * budget, ALLOWANCE_MIN)


def classify_run(returncode, output, metrics, budget=None, allowance=None, metric=None):
    """Pure. The verdict of a run from run.sh's exit code alone, never from its text (the candidate writes part of
    it), and a reason from run.sh's last own message (a set-up error spans lines):
    0 ok, or crash without val_<METRIC>, or invalid (over the time budget, when an allowance is given); 1 (train.py)
    and 3 (the evaluator refused or failed on the hand-off) crash; 2 setup (the sandbox could not run: not the
    candidate's fault); 124 timeout; 137 crash (out of memory); 130, 143 interrupted."""
    lines = [line for line in output.split("\n") if line.strip()]
    start = max((i for i, line in enumerate(lines) if line.startswith("run.sh: ")), default=len(lines) - 1)
    said = " ".join(line.strip() for line in lines[start:])
    if returncode == 0:
        if (metric or project_metric()).column not in metrics:
            return "crash", "no trusted metric"
        wall = metrics.get("train_wall_seconds")
        if allowance is not None and (wall is None or wall > budget + allowance):
            took = "has no trusted train_wall_seconds" if wall is None else f"took {wall:.0f}s"
            return "invalid", (f"over the time budget: training {took}, more than the {budget}s budget + "
                               f"{allowance:.0f}s allowed for start-up and export (max({ALLOWANCE_SHARE:.0%} of "
                               f"the budget, {ALLOWANCE_MIN:g}s)); TIME_BUDGET is fixed by the harness")
        return "ok", ""
    if returncode == 2:
        return "setup", said[:500] or "run.sh exit 2"
    if returncode == 124:
        return "timeout", said[:200] or "timed out"
    if returncode == 137:
        return "crash", "out of memory"
    if returncode in (130, 143):
        return "interrupted", said[:200] or f"run.sh exit {returncode}"
    return "crash", f"run.sh exit {returncode}" + (f": {said[:200]}" if said else "")


def parse_error(src):
    """Pure. Why train.py's source does not parse as Python (a syntax error, a NUL byte), or None."""
    try:
        ast.parse(src)
    except (SyntaxError, ValueError) as e:   # a NUL byte: either, by Python version
        return f"train.py does not parse: {getattr(e, 'msg', e)}" + (f" (line {e.lineno})" if getattr(
            e, "lineno", None) else "")
    return None


def train_limit(num_ctx, system_chars):
    """Pure. The most characters train.py may have: the first prompt holds the system prompt (program.md and the
    rules), the tool schemas, the notes, the recent results and all of train.py, within the share of the context left
    after TOKEN_RESERVE, counted at a conservative CHARS_PER_TOKEN."""
    return int(num_ctx * (1 - TOKEN_RESERVE) * CHARS_PER_TOKEN) - system_chars - PROMPT_OTHER_CHARS


def apply_edit(text, old, new):
    """Pure. Returns (new_text, None) or (None, error message for the model)."""
    if not isinstance(old, str) or not isinstance(new, str):
        return None, "old_text and new_text must be strings"
    if not old:
        return None, "old_text is empty; copy the exact lines you want to replace"
    n = text.count(old)
    if n == 1:
        return text.replace(old, new, 1), None
    if n > 1:
        return None, f"old_text occurs {n} times; include more surrounding lines so it occurs exactly once"
    first = old.strip().split("\n")[0].strip()
    close = difflib.get_close_matches(first, [line.strip() for line in text.split("\n")], n=1, cutoff=0.6)
    hint = f" The closest line in the file is: {close[0]!r}" if close else ""
    return None, "old_text not found; copy it exactly from the current file, including indentation." + hint


def pooled_sigma(groups):
    """Run-to-run standard deviation pooled over groups of repeated runs of one commit (different seeds)."""
    ss, dof = 0.0, 0
    for g in groups:
        if len(g) >= 2:
            m = sum(g) / len(g)
            ss += sum((x - m) ** 2 for x in g)
            dof += len(g) - 1
    return math.sqrt(ss / dof) if dof else None


def decide(values, best, sigma, z=2.0, floor=0.01, confirm=False, metric=None):
    """Pure keep/discard rule in the metric's direction. Returns (status, delta = mean - best, threshold, why).

    Keep iff mean(values) improves on best by more than threshold = max(z*sigma/sqrt(n), floor*|best|), where n
    runs (different seeds) average the noise down. With confirm, a single run that improves on best by more than
    the floor asks for a second run ("confirm"); it is kept if both runs improve on best by more than the floor
    and their mean passes the threshold. sigma None (unknown) falls back to the floor alone."""
    if not values:
        raise ValueError("decide needs at least one value")
    metric = metric or project_metric()
    n = len(values)
    mean = sum(values) / n
    delta, gain = mean - best, metric.gain(mean, best)
    floor_abs = floor * abs(best)
    threshold = max(z * sigma / math.sqrt(n), floor_abs) if sigma else floor_abs
    sig = "unknown" if sigma is None else f"{sigma:.4g}"
    why = f"delta {delta:+.4g}, sigma {sig}, threshold {threshold:.4g}, n {n}"
    if confirm:
        if n == 1:
            return ("confirm" if gain > floor_abs else "discard"), delta, threshold, why
        if any(metric.gain(v, best) <= floor_abs for v in values):
            return "discard", delta, threshold, why + ", runs disagree"
    if gain > threshold:
        return "keep", delta, threshold, why + ", improvement > threshold"
    return "discard", delta, threshold, why + ", not > threshold"


def parse_phases(program_text):
    """`## Phase N: title` headings of program.md, in order."""
    found = re.findall(r"^##\s*Phase\s*(\d+)\s*:\s*(.+?)\s*$", program_text, re.M)
    return [f"Phase {n}: {t}" for n, t in found] or ["Phase 1: free exploration"]


def phase_index(statuses, n_phases, every=10, plateau=5):
    """Pure. Advance after `every` experiments in a phase or `plateau` in a row without a keep."""
    idx = in_phase = since_keep = 0
    for s in statuses:
        if s in ("baseline", "interrupted"):
            continue
        in_phase += 1
        since_keep = 0 if s == "keep" else since_keep + 1
        if idx < n_phases - 1 and (in_phase >= every or since_keep >= plateau):
            idx, in_phase, since_keep = idx + 1, 0, 0
    return idx


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


def unwritable(args):
    """Pure. Why a tool call's string arguments cannot be written as UTF-8 (a lone surrogate from JSON such as
    "\\ud800"), or None."""
    for k, v in args.items():
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"{k} holds {v[e.start]!r} at character {e.start}, which cannot be written as UTF-8 (a lone "
                        f"surrogate): send plain text")
    return None


def fmt(v):
    """For people (the prompt, the terminal, the plot): 4 significant digits. results.tsv holds values exactly."""
    return "" if v is None or v == "" else f"{float(v):.4g}" if isinstance(v, (int, float)) else str(v)


def results_table(rows, max_rows, metric):
    """Compact table of recent results for the prompt (most recent last)."""
    col = metric.column
    w = max(14, len(col) + 1)
    lines = [f"exp  status       {col:<{w}} delta     description"]
    shown = rows[-max_rows:] if max_rows else []
    if len(rows) > len(shown):
        lines.append(f"... {len(rows) - len(shown)} older experiments omitted (read_file results.tsv for all)")
    for r in shown:
        lines.append(f"{r['experiment']:<4} {r['status']:<12} {fmt(r[col]) or '-':<{w}} "
                     f"{fmt(r['delta']) or '-':<9} {r['description'][:90]}")
    return "\n".join(lines)


TOOL_RULES = """
# How this loop works (rules of the harness)
You are the researcher in an automated loop. Every experiment is a fresh conversation. Work ONLY through tools:
- read_file(path): train.py, program.md, scratchpad.md, results.tsv, or the last run's log (path given below).
- edit_file(path, old_text, new_text): path is train.py or scratchpad.md. old_text must occur exactly once in
  the current file: copy it exactly, whole lines with their indentation. Keep edits small.
- run_experiment(description): ends your turn; the harness trains train.py in a sandbox and evaluates it.
  description = a one-sentence hypothesis, e.g. "raise LR from 2e-4 to 4e-4: loss still falling at the end".
Procedure: 1) look at the results and the scratchpad, 2) pick ONE change that fits the current phase and has
not been tried, 3) edit train.py, 4) add a short note (hypothesis, what to try next) to scratchpad.md,
5) call run_experiment. The harness keeps your change only if {metric} ({better} is better) improves by more
than the run-to-run noise; otherwise train.py is reverted, but scratchpad.md notes are kept.
The time budget is fixed: the harness times every training run itself, and a run that takes clearly longer than
TIME_BUDGET plus the baseline's start-up and export time is recorded invalid, never kept. Do not raise TIME_BUDGET
or train past it; make training better within it.
Call tools with the tool-calling interface. If you cannot, reply with ONLY a JSON object like
{"name": "edit_file", "arguments": {"path": "train.py", "old_text": "...", "new_text": "..."}}.
"""


def fill_metric(text, metric):
    """Pure. program.md and the rules write the metric as {metric} and its direction as {better} (lower, higher)."""
    return text.replace("{metric}", metric.column).replace("{better}", metric.better)


def build_system_prompt(program_text, metric=None):
    return fill_metric(program_text.rstrip() + "\n\n" + TOOL_RULES.strip() + "\n", metric or project_metric())


def build_user_message(train_src, scratchpad, rows, best_line, phase_line, log_path=None,
                       max_rows=15, scratch_chars=SCRATCHPAD_MAX_CHARS, metric=None):
    """Pure. The one user message of an experiment's fresh conversation."""
    metric = metric or project_metric()
    if len(scratchpad) > scratch_chars:
        scratchpad = "[... older notes cut to fit the context ...]\n" + scratchpad[-scratch_chars:]
    parts = [
        f"Current phase: {phase_line}",
        f"Current best: {best_line}",
        f"Recent results ({metric.better} {metric.column} is better):\n" + results_table(rows, max_rows, metric),
        "scratchpad.md (your notes; keep them short and condensed):\n```\n" + scratchpad.rstrip() + "\n```",
        "train.py (current best version):\n```python\n" + train_src.rstrip() + "\n```",
    ]
    if log_path:
        parts.append(f"The last run's log is {log_path} (read_file it if useful).")
    parts.append("Make ONE change for this phase with edit_file, note it in scratchpad.md, then call "
                 "run_experiment.")
    return "\n\n".join(parts)


def parse_trailers(message):
    """`Key: value` lines of a structured commit message."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^([A-Z][A-Za-z-]*): (.*)$", message, re.M)}


def commit_message(exp, description, phase_line, status, value=None, delta=None, extra=None, metric=None):
    lines = [f"exp {exp}: {clean_text(description, 72)}", "", f"Hypothesis: {clean_text(description, 1000)}",
             f"Experiment: {exp}", f"Phase: {phase_line}", f"Status: {status}"]
    if value is not None:
        lines.append(f"Metric: {(metric or project_metric()).column} {cell(value)}")
    if delta is not None:
        lines.append(f"Delta: {cell(delta)}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Every experiment ends in one Outcome, which makes one row. Rows stay typed in memory; results.tsv (untracked,
# append-only, fsync'd so that kill -9 loses no recorded row) holds them exactly and is read back only on --resume.

@dataclass
class Outcome:
    """How one experiment ended, filled in as it runs: Loop.conclude() keeps or reverts its commit and records it."""
    experiment: int
    status: str = "interrupted"   # until decided: baseline keep discard crash timeout invalid interrupted
    description: str = ""
    reason: str = ""
    phase: str = ""
    commit: str = ""              # its candidate commit (the keep commit once kept); "" before it made one
    base: str = ""                # the commit it started from, where it goes back to unless kept ("" for the baseline)
    values: list = field(default_factory=list)   # val_<METRIC> of each of its seeded runs
    delta: float = None           # mean(values) - the best it was compared with
    threshold: float = None
    train_wall_seconds: float = None
    model_seconds: float = 0.0
    run_seconds: float = 0.0
    prompt_tokens: int = 0
    started: float = None         # time.time() at its start: wall_seconds
    agent: str = "llm"
    round: int = 0
    worker: int = 0
    time_budget: int = None


def decision_line(row, metric):
    """Pure. How an experiment ended, as a sentence for the terminal: the baseline by the mean of its runs (the number
    every later decision compares with), a keep by its new best, anything else by the best it leaves standing."""
    col, runs, best = metric.column, runs_of(row), fmt(row["best"]) or "-"
    mean = fmt(sum(runs) / len(runs)) if runs else "-"
    head = f"experiment {row['experiment']}: "
    if row["status"] == "baseline":
        return head + f"baseline {col} {best} (the mean of {len(runs)} runs), noise sigma {fmt(row['sigma']) or '-'}"
    if row["status"] == "keep":
        return head + f"KEPT, {col} {mean} over {len(runs)} run(s): {row['reason']}. The new best is {best}"
    what = f"{row['status']}, {col} {mean}" if runs else row["status"]
    return head + f"{what}: {row['reason']}. The best stays {best}"


def make_row(o, rows, metric, now):
    """Pure. The one row builder: an Outcome as a typed results row, after `rows`. A baseline or keep is the new best
    (the mean of its runs); any other row carries the best it was compared with. sigma is the noise its decision used
    (for the baseline, its own runs')."""
    own = o.status in ("baseline", "keep")
    return {"experiment": o.experiment, "commit": o.commit, metric.column: o.values[0] if o.values else None,
            "delta": o.delta, "status": o.status, "description": o.description, "runs": tuple(o.values),
            "best": sum(o.values) / len(o.values) if own else state_from_rows(rows)[0],
            "sigma": pooled_sigma([o.values] if o.status == "baseline" else noise_groups(rows)),
            "threshold": o.threshold, "reason": o.reason, "phase": o.phase, "best_commit": o.commit if own else o.base,
            "model_seconds": o.model_seconds, "run_seconds": o.run_seconds,
            "wall_seconds": now - o.started if o.started else None, "prompt_tokens": o.prompt_tokens,
            "finished": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"), "agent": o.agent,
            "train_wall_seconds": o.train_wall_seconds, "round": o.round, "worker": o.worker,
            "time_budget": o.time_budget}


def typed_row(cells, metric):
    """Pure. A results.tsv row (text by column name) as the loop keeps it: numbers as numbers, runs as a tuple.
    Rows of a harness before rounds and workers: every experiment was its own round (the baseline's 0), worker 0."""
    row = {}
    for c in metric.columns:
        v = cells.get(c, "")
        row[c] = v if c in TEXT_COLUMNS else tuple(runs_of(cells)) if c == "runs" else num(v)
        if c in INT_COLUMNS and row[c] is not None:
            row[c] = int(row[c])
    if row["round"] is None:
        row["round"] = 0 if row["status"] == "baseline" else row["experiment"]
    if row["worker"] is None:
        row["worker"] = 0
    return row


def cell(v):
    """A value as results.tsv and the keep commit's trailers write it: a float exactly (its repr, so that --resume
    reads back the very number the run decided with), a tuple comma-separated, text on one line."""
    if v is None:
        return ""
    if isinstance(v, (tuple, list)):
        return ",".join(cell(x) for x in v)
    if isinstance(v, float):
        r = repr(v)
        return r[:-2] if r.endswith(".0") else r
    return clean_text(v, 500)


def format_row(row, columns):
    return "\t".join(cell(row.get(c)) for c in columns) + "\n"


def parse_results(text, path=RESULTS):
    """Pure. (header, rows as dicts by column name) of a results file, ([], []) for an empty one. Anything but the
    contract's header (experiment commit val_<METRIC> delta status description ...) and complete rows of it is one
    HarnessError naming the line: a file that is not what the harness wrote is never read half-way."""
    if not text.strip():
        return [], []
    lines = text.split("\n")
    header = lines[0].split("\t")
    if len(header) < 6 or header[:2] != ["experiment", "commit"] or not header[2].startswith("val_") or \
            header[3:6] != ["delta", "status", "description"]:
        raise HarnessError(f"{path} line 1 is not the header of a results file (experiment, commit, val_<METRIC>, "
                           f"delta, status, description, ...): move the file away (mv {path} results-old.tsv)")
    rows = []
    for i, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = line.split("\t")
        row = dict(zip(header, cells))
        bad = ("it has no newline at its end (cut short by a crash?)" if i == len(lines) else
               f"it has {len(cells)} cells, not {len(header)}" if len(cells) != len(header) else
               next((f"{c} is {row[c][:20]!r}" for c in header if not _cell_ok(c, row[c])), None))
        if bad:
            raise HarnessError(f"{path} line {i} is not a row autoresearch wrote ({bad}): delete or repair that line, "
                               f"then run again")
        rows.append(row)
    return header, rows


def _cell_ok(column, v):
    """Pure. Whether a results.tsv cell can be what the harness writes in that column."""
    if column == "experiment":
        return v.isdigit()
    if column == "status":
        return v in STATUSES
    if column in TEXT_COLUMNS or not v:
        return True
    return all(num(x) is not None for x in v.split(",")) if column == "runs" else num(v) is not None


def load_results(path=RESULTS, metric=None):
    """Rows of a results file as text by column name; given a metric, a file of another metric is refused."""
    if not os.path.exists(path):
        return []
    header, rows = parse_results(read_text(path), path)
    if metric and header and header[2] != metric.column:
        raise HarnessError(f"{path} records {header[2]}, but this project's prepare_data.py declares METRIC = "
                           f"{metric.name!r} ({metric.column}): those are results of another metric. Move the file "
                           f"away (mv {path} results-old.tsv), or go back to the prepare_data.py it was written under")
    return rows


def upgrade_results(metric, path=RESULTS):
    """--resume of a results.tsv an older harness wrote: rewrite it (atomically) under today's columns, with round and
    worker as typed_row reads them. Columns no longer written (once, a project's second metric) stay, at the end."""
    if not os.path.exists(path):
        return
    header, rows = parse_results(read_text(path), path)
    if not header or header[:len(metric.columns)] == metric.columns:
        return
    columns = metric.columns + [h for h in header if h not in metric.columns]
    new = [{**r, **{k: typed_row(r, metric)[k] for k in ("round", "worker")}} for r in rows]
    write_text(path, "\t".join(columns) + "\n" + "".join(format_row(r, columns) for r in new))


def append_row(row, path=RESULTS, metric=None):
    """Add one row under the file's header (the file rewritten whole, write_text); a new file starts with the
    project's header."""
    old = read_text(path) if os.path.exists(path) else ""
    old = old or "\t".join((metric or project_metric()).columns) + "\n"
    write_text(path, old + format_row(row, old.split("\n", 1)[0].split("\t")))


def num(v):
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def runs_of(row):
    """The values of a row's seeded runs: a tuple in memory, comma-separated in a results file."""
    v = row.get("runs") or ()
    return [x for x in map(num, v.split(",") if isinstance(v, str) else v) if x is not None]


def noise_groups(rows):
    """Groups of repeated runs (same commit, different seeds) recorded in the `runs` column."""
    return [g for g in (runs_of(r) for r in rows if r["status"] in ("baseline", "keep")) if len(g) >= 2]


def pending_baseline(rows):
    """Pure. The row of a baseline that stopped part-way (interrupted, round 0: its runs are the seeds that finished)
    while no baseline is recorded, else None."""
    if any(r["status"] == "baseline" for r in rows):
        return None
    return next((r for r in reversed(rows) if r["status"] == "interrupted" and r["round"] == 0), None)


def baseline_failure(run, seed, values, wall, budget, grace):
    """Pure. Why baseline seed `seed` failed, in words a user can act on. A timeout after seeds that finished well
    within the limit is the machine's (busy), not train.py's."""
    limit = f"its limit of budget {budget}s + grace {grace}s (AUTORESEARCH_GRACE)"
    if run.status == "timeout" and values:
        return (f"baseline seed {seed} ran out of time ({limit}), where seeds 1-{seed - 1} finished (the slowest "
                f"training container took {wall:.0f}s): the machine was slower this time (busy?), not train.py over "
                f"its budget. The {len(values)} finished seeds are recorded. Free the machine, or export "
                f"AUTORESEARCH_GRACE={2 * grace} for more time.")
    if run.status == "timeout":
        return (f"baseline seed 1 ran out of time ({limit}): does train.py stop at TIME_BUDGET? If its start-up and "
                f"export take that long, export AUTORESEARCH_GRACE={2 * grace}; on a busy machine, free it first.")
    return (f"baseline seed {seed} failed ({run.status}: {run.reason}); see {run.log}"
            + (f" (the {len(values)} finished seeds are recorded)" if values else "") +
            f". Fix train.py or the sandbox, and commit the fix on this branch (a new commit runs every seed again).")


def state_from_rows(rows):
    """Pure. (best value, best commit, best experiment, baseline experiment) from recorded rows."""
    best = best_commit = best_exp = base_exp = None
    for r in rows:
        if r["status"] == "baseline":
            base_exp = r["experiment"]
            best, best_exp = num(r["best"]), r["experiment"]
        elif r["status"] == "keep":
            best, best_exp = num(r["best"]), r["experiment"]
        if r.get("best_commit"):
            best_commit = r["best_commit"]
    return best, best_commit, best_exp, base_exp


# ----------------------------------------------------------------------------------------------
# Tuner agents (--agent optuna|random): the search space read from train.py (or program.md), proposals from every
# recorded result, and each trial written into train.py as an ordinary edit. Only the proposer differs from the LLM.

FRACTIONS = ("_FRAC", "_PROB")    # constants named so are fractions or probabilities: searched within [0, 1]
SPACE_LINE = re.compile(r"([A-Z][A-Z0-9_]*)\s*:\s*(\S+)\s+(\S+)\s+(\S+)")
SPACE_FORMAT = "NAME: log|float|int LOW HIGH, e.g. `LEARNING_RATE: log 1e-4 4e-3`"


@dataclass(frozen=True)
class Param:
    """One searched constant: `log` (log-uniform float), `float` (uniform) or `int` (uniform integer) in [low, high]."""
    name: str
    kind: str
    low: float
    high: float

    def snap(self, v):
        """The value as written into train.py: 4 significant digits (or an integer), inside the range."""
        v = round(v) if self.kind == "int" else float(f"{v:.4g}")
        return min(max(v, self.low), self.high)

    def literal(self, v):
        if self.kind == "int":
            return str(int(v))
        s = f"{v:.4g}"
        return s if any(c in s for c in ".en") else s + ".0"   # stays a float literal (100.0, not 100)


def _number(node, depth=0):
    """Pure. The value of literals combined with + - * / (e.g. 1 / 0.07), else None (calls, names, bools, text,
    and expressions nested deeper than any constant needs: a model-written 1+1+...+1 must not exhaust the stack)."""
    if depth > 20:
        return None
    if isinstance(node, ast.Constant):
        return node.value if type(node.value) in (int, float) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _number(node.operand, depth + 1)
        return None if v is None else -v if isinstance(node.op, ast.USub) else v
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}   # no ** : 10 ** 10 ** 10 would hang the harness
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        a, b = _number(node.left, depth + 1), _number(node.right, depth + 1)
        if a is not None and b is not None and not (isinstance(node.op, ast.Div) and b == 0):
            return ops[type(node.op)](a, b)
    return None


def _device_branch(stmt, device):
    """Pure. For `if DEVICE == "x":` / `!=` the statements that run on `device`, else None (not a preset block)."""
    t = stmt.test if isinstance(stmt, ast.If) else None
    if not (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "DEVICE"
            and len(t.ops) == 1 and isinstance(t.ops[0], (ast.Eq, ast.NotEq))
            and isinstance(t.comparators[0], ast.Constant) and isinstance(t.comparators[0].value, str)):
        return None
    runs = (device == t.comparators[0].value) == isinstance(t.ops[0], ast.Eq)
    return stmt.body if runs else stmt.orelse


def hyperparameters(train_src, cuda):
    """Pure. {NAME: ast.Assign} of the numeric UPPER_CASE constants of train.py's active preset.

    The hyperparameter section is the module level up to and including the `if DEVICE == "cuda": ... else: ...`
    preset block (all of it without one); of that block only the branch that runs counts: the cuda one iff
    cuda (torch.cuda.is_available(), the test train.py makes). Values must be numbers or arithmetic on
    numbers: TIME_BUDGET = float(os.environ...), booleans, strings and dicts are not searched. The last
    assignment of a name wins, as when the module runs."""
    device = "cuda" if cuda else "cpu"
    found = {}

    def collect(stmts):
        for s in stmts:
            branch = _device_branch(s, device)
            if branch is not None:
                collect(branch)
            elif (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
                  and re.fullmatch(r"[A-Z][A-Z0-9_]*", s.targets[0].id) and _number(s.value) is not None):
                found[s.targets[0].id] = s

    for stmt in ast.parse(train_src).body:
        collect([stmt])
        if _device_branch(stmt, device) is not None:
            break
    return found


def derived_space(consts):
    """Pure. The default space around the current values: floats log-uniform from x1/4 to x4, ints uniform from
    x1/2 to x2, fractions and probabilities (names ending in _FRAC or _PROB) log-uniform clipped to [0, 1].
    Zero and negative constants have no scale to multiply and are left out (list them in program.md)."""
    space = []
    for name, node in consts.items():
        v = _number(node.value)
        if v <= 0:
            continue
        if isinstance(v, int) and not name.endswith(FRACTIONS):
            p = Param(name, "int", math.ceil(v / 2), 2 * v)
        else:
            hi = min(4 * v, 1.0) if name.endswith(FRACTIONS) else 4 * v
            p = Param(name, "log", float(f"{v / 4:.4g}"), float(f"{hi:.4g}"))
        if p.low < p.high:
            space.append(p)
    return space


def parse_search_space(program_text, consts, preset="active"):
    """Pure. The `## Search space` block of program.md as [Param], or None without one.

    One constant per line, `NAME: log|float|int LOW HIGH`; blank lines, ``` fences, list dashes and backticks
    around a line are ignored; the next `#` heading ends the block. Bad input: one HarnessError naming the line."""
    lines = program_text.split("\n")
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"##\s*search space\s*", line.strip(), re.I)]
    if len(starts) > 1:
        raise HarnessError(f"{PROGRAM} has {len(starts)} ## Search space blocks (lines "
                           f"{', '.join(str(i + 1) for i in starts)}): keep one")
    if not starts:
        return None
    start = starts[0]
    space = []
    for i in range(start + 1, len(lines)):
        raw = lines[i].strip()
        if raw.startswith("#"):
            break
        line = raw.lstrip("-* ").strip("`").strip()
        if not line or raw.startswith("```"):
            continue

        def bad(why):
            return HarnessError(f"{PROGRAM} line {i + 1} ({raw!r}) in ## Search space: {why}; "
                                f"expected {SPACE_FORMAT}")
        m = SPACE_LINE.fullmatch(line)
        if not m:
            raise bad("not a search-space line")
        name, kind, lo, hi = m.groups()
        if kind not in ("log", "float", "int"):
            raise bad(f"unknown kind {kind!r} (log, float or int)")
        try:
            low, high = float(lo), float(hi)
        except ValueError:
            raise bad("LOW and HIGH must be numbers") from None
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise bad("LOW must be a finite number below HIGH")
        if kind == "log" and low <= 0:
            raise bad("a log range needs LOW > 0")
        if kind == "int":
            if low != int(low) or high != int(high):
                raise bad("int bounds must be whole numbers")
            low, high = int(low), int(high)
        if name not in consts:
            raise bad(f"{name} is not a numeric constant of train.py's {preset} preset (those are: "
                      f"{', '.join(consts) or 'none'})")
        if any(p.name == name for p in space):
            raise bad(f"{name} is listed twice")
        space.append(Param(name, kind, low, high))
    if not space:
        raise HarnessError(f"{PROGRAM}'s ## Search space block lists no constants; expected lines like {SPACE_FORMAT}")
    return space


def search_space(train_src, program_text, cuda):
    """Pure. program.md's `## Search space` block if it has one, else the space derived from train.py."""
    try:
        consts = hyperparameters(train_src, cuda)
    except SyntaxError as e:
        raise HarnessError(f"train.py does not parse ({e.msg}, line {e.lineno}): fix it before tuning") from None
    space = parse_search_space(program_text, consts, "cuda" if cuda else "cpu")
    space = derived_space(consts) if space is None else space
    if not space:
        raise HarnessError("train.py has no numeric UPPER_CASE constants to search: add a ## Search space block "
                           f"to {PROGRAM} ({SPACE_FORMAT})")
    if sum(len(p.name) + 12 for p in space) > 480:    # the description cell of results.tsv holds the trial
        raise HarnessError(f"the search space ({len(space)} constants) is too large to record each trial in "
                           f"{RESULTS}: list the constants to search in a ## Search space block of {PROGRAM}")
    return space


def apply_params(train_src, literals, cuda):
    """Pure. train.py with the value of each constant in {NAME: source text} replaced in the active preset,
    nothing else touched."""
    consts = hyperparameters(train_src, cuda)
    missing = [n for n in literals if n not in consts]
    if missing:
        raise HarnessError(f"train.py no longer has the searched constant(s) {', '.join(missing)} in its "
                           f"active preset")
    src = train_src.encode("utf-8")            # ast offsets count bytes
    starts = [0] + [i + 1 for i, b in enumerate(src) if b == ord("\n")]
    edits = []
    for name, text in literals.items():
        v = consts[name].value
        edits.append((starts[v.lineno - 1] + v.col_offset, starts[v.end_lineno - 1] + v.end_col_offset, text))
    for a, b, text in sorted(edits, reverse=True):
        src = src[:a] + text.encode("utf-8") + src[b:]
    return src.decode("utf-8")


def format_params(space, params):
    """Pure. A trial as results.tsv's description, `NAME=value ...`, in the space's order."""
    return " ".join(f"{p.name}={p.literal(params[p.name])}" for p in space)


def parse_params(description, space):
    """Pure. The trial written by format_params, or None if the description is not one of this space."""
    pairs = dict(tok.split("=", 1) for tok in description.split() if "=" in tok)
    if sorted(pairs) != sorted(p.name for p in space):
        return None
    try:
        return {p.name: p.snap(float(pairs[p.name])) for p in space}
    except ValueError:
        return None


def random_params(space, seed, k):
    """Pure. The k-th trial of the random agent: uniform (log-uniform for `log`), reproducible from (seed, k)."""
    rng = random.Random(f"{seed}:{k}")
    out = {}
    for p in space:
        if p.kind == "int":
            v = rng.randint(p.low, p.high)
        elif p.kind == "log":
            v = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
        else:
            v = rng.uniform(p.low, p.high)
        out[p.name] = p.snap(v)
    return out


def tuner_trials(rows, agent, space, metric=None):
    """Pure. (done, pending) of one agent from results rows. done: [(params, value)] in order, value None for a
    crash or timeout (a failed trial), else the mean of the trial's seeded runs. pending: trials that were
    interrupted and not run to a verdict since; they run again first, so no trial is lost or repeated."""
    col = (metric or project_metric()).column
    done, pending = [], []
    for r in rows:
        if r.get("agent") != agent or r["status"] == "baseline":
            continue
        params = parse_params(r["description"], space)
        if r["status"] == "interrupted":
            if params is not None and params not in pending:   # None: stopped before a trial was proposed
                pending.append(params)
            continue
        if params is None:
            raise HarnessError(f"experiment {r['experiment']} in {RESULTS} is not a trial of this search space "
                               f"({r['description'][:80]!r}): resume with the {PROGRAM} and train.py it started with")
        if params in pending:
            pending.remove(params)
        runs = runs_of(r)
        value = None if r["status"] in ("crash", "timeout", "invalid") else (
            sum(runs) / len(runs) if runs else num(r[col]))
        done.append((params, value))
    return done, pending


class RandomSampler:
    def __init__(self, space, seed):
        self.space, self.seed = space, seed

    def propose(self, done):
        return random_params(self.space, self.seed, len(done))


class OptunaSampler:
    """TPE through Optuna's ask/tell interface, in the metric's direction; results recorded before this process
    started are added as trials."""
    def __init__(self, space, seed, metric=None):
        try:
            import optuna
        except ImportError:
            raise HarnessError("--agent optuna needs Optuna: pip install optuna") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.space, self.seed = optuna, space, seed
        self.direction = (metric or project_metric()).direction
        D = optuna.distributions
        self.dists = {p.name: D.IntDistribution(p.low, p.high) if p.kind == "int"
                      else D.FloatDistribution(p.low, p.high, log=p.kind == "log") for p in space}
        self.study, self.asked, self.told = None, {}, 0

    def propose(self, done):
        optuna = self.optuna
        if self.study is None:   # a fresh sampler with the run's first seed would propose the first trials again
            self.study = optuna.create_study(direction=self.direction,
                                             sampler=optuna.samplers.TPESampler(seed=self.seed + len(done)))
        for params, value in done[self.told:]:
            state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
            trial = self.asked.pop(json.dumps(params, sort_keys=True), None)
            if trial is None:
                self.study.add_trial(optuna.trial.create_trial(params=params, distributions=self.dists,
                                                               value=value, state=state))
            else:
                self.study.tell(trial, value, state=state)
        self.told = len(done)
        trial = self.study.ask(self.dists)
        params = {p.name: p.snap(trial.params[p.name]) for p in self.space}
        self.asked[json.dumps(params, sort_keys=True)] = trial
        return params


class Tuner:
    """A tuner agent: the search space of the run's baseline, and the sampler that proposes its trials."""
    def __init__(self, agent, train_src, program_text, cuda, seed, metric):
        self.agent, self.cuda, self.metric = agent, cuda, metric
        self.space = search_space(train_src, program_text, cuda)
        self.sampler = OptunaSampler(self.space, seed, metric) if agent == "optuna" else RandomSampler(self.space, seed)

    def next_edit(self, rows, train_src):
        """(train.py with the next trial applied, its description)."""
        done, pending = tuner_trials(rows, self.agent, self.space, self.metric)
        params = pending[0] if pending else self.sampler.propose(done)
        text = {p.name: p.literal(params[p.name]) for p in self.space}
        return apply_params(train_src, text, self.cuda), format_params(self.space, params)


# ----------------------------------------------------------------------------------------------
# Impure steps.

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


def read_scratchpad():
    """scratchpad.md's notes, None where the project has none."""
    return read_text(SCRATCHPAD) if os.path.exists(SCRATCHPAD) else None


def write_text(path, text):
    """The one way the harness writes a file: whole, or not at all. Encoded first (a lone surrogate raises here, before
    anything is touched), written to PATH.tmp beside it, fsync'd and renamed over it, so that a crash or kill -9
    leaves the old file or the new one, never half of either (nor an empty train.py)."""
    data = text.encode("utf-8")
    with open(path + TMP, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + TMP, path)


def env_int(name, default, environ=os.environ):
    """A whole number above 0 from the environment, `default` where unset or empty."""
    v = environ.get(name, "").strip()
    if v and not re.fullmatch(r"[1-9][0-9]*", v):
        raise HarnessError(f"{name} must be a whole number above 0, got {v!r}")
    return int(v) if v else default


def env_size(name, default, environ=os.environ):
    """Bytes of a size from the environment written as podman and run.sh take it (16g, 500m, 2G, 1048576)."""
    v = environ.get(name, "").strip() or default
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)", v.lower())
    if not m or float(m.group(1)) <= 0:
        raise HarnessError(f"{name} must be a size like 16g or 500m, got {v!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def check_environment(environ=os.environ):
    """Every number the user may set for the loop and run.sh, checked before anything changes: one error naming the
    variable as the user wrote it."""
    for name in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_GRACE", "AUTORESEARCH_EVAL_TIMEOUT", "AUTORESEARCH_PIDS"):
        env_int(name, 1, environ)
    for name, default in SIZES.items():
        env_size(name, default, environ)
    cpus = environ.get("AUTORESEARCH_CPUS", "").strip()
    if cpus and (num(cpus) is None or num(cpus) <= 0):
        raise HarnessError(f"AUTORESEARCH_CPUS must be a positive number of cores like 2 or 0.5, got {cpus!r}")


def data_dir():
    return os.environ.get("AUTORESEARCH_DATA") or "data"


def dirty_files(cwd="."):
    p = spawn(["git", "status", "--porcelain", "--untracked-files=all"], cwd=cwd)   # not git(): it strips column 1
    if p.returncode != 0:
        raise HarnessError(f"git status failed: {p.stderr.strip()}")
    files = [line[3:].strip().strip('"') for line in p.stdout.split("\n") if line.strip()]
    return [f for f in files if not f.startswith(OUR_OUTPUTS) and not f.endswith(TMP)]


def make_client(host, timeout):
    import ollama  # the only non-stdlib dependency of the loop
    return ollama.Client(host=host, timeout=timeout)


def ollama_error(e):
    """A readable one-liner for whatever the ollama client / httpx raised."""
    name = type(e).__name__
    status = getattr(e, "status_code", None)
    text = getattr(e, "error", None) or str(e)
    return f"{name}{f' {status}' if status and status != -1 else ''}: {text}"


def is_connection_error(e):
    return isinstance(e, (ConnectionError, OSError)) or type(e).__module__.startswith(("httpx", "httpcore"))


def is_transient(e):
    """Worth retrying: Ollama is down or restarting, timed out, or failed on its side (5xx, e.g. a crashed runner)."""
    return is_connection_error(e) or (getattr(e, "status_code", 0) or 0) >= 500


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


def startup_checks(args, client):
    """Every failure is one message that names the fix (lock_repo has checked that this is a git checkout)."""
    top = git("rev-parse", "--show-toplevel")
    if os.path.realpath(top) != os.path.realpath(os.getcwd()):
        raise HarnessError(f"run autoresearch from the repository root: cd {top}")
    for f in (TRAIN, PROGRAM, "run.sh"):
        if not os.path.exists(f):
            raise HarnessError(f"{f} is missing in {os.getcwd()}")
    project_metric()   # declared, and declared right
    if git("rev-parse", "--verify", "-q", "HEAD", check=False) == "":
        raise HarnessError("the repository has no commit yet: git add -A && git commit -m init")
    dirty = dirty_files()
    allowed_dirty = set(EDITABLE) if args.resume else set()
    if set(dirty) - allowed_dirty:
        raise HarnessError("the working tree is not clean (" + ", ".join(sorted(dirty)[:5]) +
                           "): commit or stash your changes first (git status)")
    if not os.path.exists(os.path.join(data_dir(), "meta.json")):
        raise HarnessError(f"no prepared data in {data_dir()}/: run python prepare_data.py")
    if args.agent == "llm":   # a tuner agent proposes without a model
        check_model(args, client)
    check_sandbox(args)


def check_model(args, client):
    try:
        models = client.list().models
    except Exception as e:  # noqa: BLE001 -- any failure here means "not reachable"
        if not is_connection_error(e):
            raise HarnessError(f"Ollama at {args.host} answered with an error: {ollama_error(e)}")
        if shutil.which("ollama") and args.serve:
            start_ollama(args, client)
            models = client.list().models
        elif shutil.which("ollama"):
            raise HarnessError(f"Ollama is not reachable at {args.host}: start it with `ollama serve` "
                               f"(or pass --serve to let autoresearch start it)")
        else:
            raise HarnessError(f"Ollama is not reachable at {args.host} and no `ollama` binary is on PATH: "
                               f"install Ollama (https://ollama.com) or pass --host")
    names = {m.model for m in models}
    if args.model not in names and f"{args.model}:latest" not in names:
        raise HarnessError(f"model {args.model!r} is not available in Ollama at {args.host}: "
                           f"run ollama pull {args.model}")
    try:
        show = client.show(args.model)
    except Exception as e:  # noqa: BLE001
        raise HarnessError(f"could not inspect model {args.model!r}: {ollama_error(e)}")
    info = show.modelinfo or {}
    # Ollama answers a chat with tools for such a model with 400 "does not support tools": say so before the baseline
    caps = show.capabilities
    if caps is not None and "tools" not in caps:
        raise HarnessError(f"model {args.model!r} does not support tool calling (its capabilities: "
                           f"{', '.join(caps) or 'none'}): choose a tool-capable model, e.g. --model {DEFAULT_MODEL} "
                           f"(ollama pull {DEFAULT_MODEL})")
    ctx = next((v for k, v in info.items() if k.endswith(".context_length")), None)
    if ctx is not None and int(ctx) < args.num_ctx:
        raise HarnessError(f"model {args.model!r} supports a context of {ctx} tokens, less than "
                           f"--num-ctx {args.num_ctx}: pass --num-ctx {ctx} or choose a bigger-context model")


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


def start_ollama(args, client):
    say("autoresearch: starting `ollama serve` ...")
    env = dict(os.environ, OLLAMA_HOST=args.host)
    spawn(["ollama", "serve"], wait=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
          start_new_session=True)
    for _ in range(60):
        time.sleep(0.5)
        try:
            client.list()
            return
        except Exception:  # noqa: BLE001
            pass
    raise HarnessError(f"started `ollama serve` but it did not answer at {args.host}")


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


# ----------------------------------------------------------------------------------------------
# Workers (--workers N): a round starts N candidates from the same best commit, each in its own git worktree
# (.worktrees/w<k>) and slot (a GPU, or a share of the cores); at its end at most one is kept.

def sidak_z(z, n):
    """Pure. The z each of n candidates must pass so that the best of n seed-only candidates passes no more often
    than one candidate passes z (Šidák): alpha = 1 - Phi(z), alpha_n = 1 - (1 - alpha)^(1/n),
    z_n = Phi^-1(1 - alpha_n)."""
    if n == 1:
        return z   # exactly, not through two roundings
    nd = statistics.NormalDist()
    alpha_n = -math.expm1(math.log1p(-nd.cdf(-z)) / n)   # 1 - (1 - alpha)^(1/n) without cancellation
    return -nd.inv_cdf(alpha_n)


def decide_round(best, sigma, values, z, floor=0.01, confirm=False, metric=None):
    """Pure. The end of a round: each candidate ({experiment: its value}) is decided against the round's starting
    best with the round's z (sidak_z); the best that passes goes on (keep, or confirm), every other that passes is
    discarded as beaten. Returns (winner or None, {experiment: (status, delta, threshold, why)})."""
    metric = metric or project_metric()
    out = {e: decide([v], best, sigma, z, floor, confirm, metric) for e, v in values.items()}
    passing = [e for e, d in out.items() if d[0] != "discard"]
    winner = max(passing, key=lambda e: (metric.gain(values[e], best), -e), default=None)   # ties: the earlier one
    for e in passing:
        if e != winner:
            _, delta, thr, why = out[e]
            out[e] = ("discard", delta, thr, f"beaten in round by experiment {winner} ({why})")
    return winner, out


def merge_scratchpads(base, finals):
    """Pure. The round's scratchpad: base (the notes at the round's start) and, under a heading per experiment, the
    lines each worker added or rewrote ({experiment: its final scratchpad}). A worker that deleted or condensed base
    lines deletes them for nobody; a note already present (in base or from an earlier worker) is not repeated."""
    out = base.rstrip("\n").split("\n") if base.strip() else []
    seen = {line.strip() for line in out if line.strip()}
    old = base.split("\n")
    for exp, text in finals.items():
        new = text.split("\n")
        added = [line for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
                 if tag in ("insert", "replace") for line in new[j1:j2]]
        added = [line for line in added if line.strip() and line.strip() not in seen]
        if added:
            out += [""] * bool(out) + [f"## Notes of experiment {exp}", *added]
            seen.update(line.strip() for line in added)
    return "\n".join(out) + "\n"


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
    mem, hand = (env_size(k, SIZES[k], environ) for k in ("AUTORESEARCH_MEMORY", "AUTORESEARCH_HANDOFF_SIZE"))
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


# ----------------------------------------------------------------------------------------------
# Launchers: where ./run.sh runs. `local`: here. `slurm`: each run is one SLURM job (srun) on a compute node that
# sees this repository, the data and the weights at the same paths (a shared filesystem, checked at start-up).
# srun streams the job's output back, so a run reads like a local one; new are only srun's own lines and the
# ways SLURM loses a job (cancelled, node failure, preemption, its time limit), which SLURM's state tells.

SLURM_LOST = {"CANCELLED": "interrupted", "NODE_FAIL": "interrupted", "PREEMPTED": "interrupted",
              "BOOT_FAIL": "interrupted", "DEADLINE": "interrupted", "REVOKED": "interrupted",
              "TIMEOUT": "timeout", "OUT_OF_MEMORY": "crash"}
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


def slurm_verdict(job_id, state, returncode, output, metrics, budget=None, allowance=None, metric=None):
    """Pure. A job SLURM lost (cancelled, node failure, preemption, its time limit) is recorded with SLURM's state as
    the reason; any other run gets run.sh's own verdict, read without srun's lines after it."""
    if state in SLURM_LOST:
        return SLURM_LOST[state], f"SLURM job {job_id} {state}"
    own = "\n".join(line for line in output.split("\n") if not SLURM_OWN_LINE.match(line))
    if state is None and not own.strip():
        raise HarnessError(f"srun started no job (exit {returncode}): {output.strip()[-500:]}\nCheck "
                           f"AUTORESEARCH_SLURM_ARGS and the cluster (sinfo), then continue with --resume")
    return classify_run(returncode, own, metrics, budget, allowance, metric)


def run_verdict(args, label, returncode, output, metrics, allowance, metric):
    """status, reason of a finished run."""
    if not on_slurm(args):
        return classify_run(returncode, output, metrics, args.time_budget, allowance, metric)
    return slurm_verdict(*slurm_state(job_name(args.tag, label)), returncode, output, metrics, args.time_budget,
                         allowance, metric)


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
    paths = [os.path.abspath(f) for f in ("run.sh", "evaluator.py", TRAIN, "prepare_data.py", os.path.join(data_dir(), "meta.json"),
                                          token)]
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


def run_sandbox(args, label, run_dir, seed, phase_short, allowance=None, metric=None, cwd=".", slot=None,
                cancel=None, started=None):
    """One run (start_run, or the one `started` waiting for its go) with a hard wall-clock limit; output streams to
    logs/<label>.log. With an allowance (candidates), a run over the budget + allowance is invalid and run.sh kills it
    soon after. A worker's run is stopped as interrupted once cancel is set; logs/ and runs/ stay in this checkout."""
    os.makedirs("logs", exist_ok=True)
    log_path = f"logs/{label}.log"
    # under SLURM the job's --time bounds the run, and time spent queueing is not the run's
    limit = math.inf if on_slurm(args) else run_limit(args.time_budget, run_grace(allowance))
    tail, buf, loss, stopped, logged = b"", b"", "-", None, 0
    plain = not sys.stdout.isatty()   # nohup, tee, a log file: a line at each start and end instead of the live line
    with open(log_path, "wb", buffering=0) as log:   # unbuffered: users (and tests) tail -f it
        p = started or start_run(args, label, run_dir, seed, allowance, cwd, slot)
        t0 = time.time()
        if plain:
            say(f"autoresearch: run {label} started (seed {seed}, {args.time_budget}s budget; log {log_path})")
        try:
            if started:
                try:
                    p.stdin.write(b"go\n")
                    p.stdin.close()
                except BrokenPipeError:
                    pass   # run.sh is gone: its own last line says why
            fd = p.stdout.fileno()
            while True:
                elapsed = time.time() - t0
                if elapsed > limit or cancel is not None and cancel.is_set():
                    stop_run(args, label, p)
                    stopped = "timeout" if elapsed > limit else "interrupted"
                    break
                r, _, _ = select.select([fd], [], [], 0.5)
                if r:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    if logged < LOG_MAX_BYTES:   # a train.py that prints without end must not fill the disk
                        log.write(chunk[:LOG_MAX_BYTES - logged])
                        logged += len(chunk)
                    tail = (tail + chunk)[-262144:]   # the metric block sits at the very end
                    buf = (buf + chunk)[-8192:]
                    *done, buf = buf.split(b"\n")
                    for line in done:
                        lv = last_loss(line.decode("utf-8", "replace"))
                        loss = lv or loss
                live(f"exp {label} | {phase_short} | {elapsed:.0f}/{args.time_budget}s | loss {loss}")
            p.wait()
            if logged > LOG_MAX_BYTES:
                log.write(b"\n[autoresearch: log cut at %d MiB; its last 256 KiB follow]\n" % (LOG_MAX_BYTES >> 20) + tail)
        except BaseException:
            stop_run(args, label, p)   # Ctrl-C: stop the containers before anything else
            raise
        finally:
            p.stdout.close()
            track_run(label, None)
    live_clear()
    out = tail.decode("utf-8", "replace")
    metrics = parse_metrics(out)
    metric = metric or project_metric()
    if stopped:
        status, reason = stopped, (f"harness wall-clock limit {limit}s exceeded" if stopped == "timeout" else
                                   "stopped: its round was interrupted")
    else:
        status, reason = run_verdict(args, label, p.returncode, out, metrics, allowance, metric)
        if status == "setup":
            raise HarnessError(f"./run.sh could not run the sandbox: {reason} (full output: {log_path}). "
                               f"Fix the set-up, then continue with --resume.")
    if status in ("crash", "timeout", "invalid"):
        reason = f"{reason}; log: {log_path}"
    lines = [line for line in out.split("\n") if line.strip()]
    run = Run(status, reason, metrics, metrics.get(metric.column), time.time() - t0, log_path,
              "\n".join(lines[-LOG_TAIL_LINES:]))
    if plain:
        say(f"autoresearch: run {label} ended after {run.seconds:.0f}s: {status}" +
            (f", {metric.column} {fmt(run.value)}" if run.value is not None else f" ({reason})"))
    return run


@dataclass
class Worker:
    """One worker of a round: its slot, its worktree, its experiment and conversation, and its run in a thread."""
    index: int
    path: str
    slot: dict
    o: Outcome
    messages: list = field(default_factory=list)
    fixes: int = 0
    run: Run = None
    started: subprocess.Popen = None   # its run, waiting for its go while the model writes (start_run)
    error: BaseException = None
    thread: threading.Thread = None
    concluded: bool = False


class Loop:
    def __init__(self, args, client, tuner=None, slots=None, alone=None):
        self.args, self.client, self.tuner = args, client, tuner   # tuner: --agent optuna|random
        self.slots = slots                   # --workers N: each worker's run environment (worker_slots, run_memory)
        self.alone = alone or {}             # the environment of a run alone on the machine (run_memory)
        self.root = "."                      # where the tools read and edit train.py and scratchpad.md
        self.agent = tuner.agent if tuner else "llm"
        self.branch = f"autoresearch/{args.tag}"
        self.metric = project_metric()
        self.program = read_text(PROGRAM)
        self.phases = parse_phases(self.program)
        self.system = build_system_prompt(self.program, self.metric)
        self.train_limit = train_limit(args.num_ctx, len(self.system))
        size = len(read_text(TRAIN))
        if self.agent == "llm" and size > self.train_limit:
            need = math.ceil((size + len(self.system) + PROMPT_OTHER_CHARS) / ((1 - TOKEN_RESERVE) * CHARS_PER_TOKEN))
            raise HarnessError(f"{TRAIN} has {size} characters, more than fit in the model's context beside "
                               f"{PROGRAM} and the rules at --num-ctx {args.num_ctx} (at most {max(0, self.train_limit)})"
                               f": pass --num-ctx {need} or more (the model must support it), or shorten {TRAIN}")
        self.chars_per_token = 3.5           # calibrated from prompt_eval_count as replies come in
        self.last_log = None
        self.rows = []                       # typed (make_row); read from results.tsv only on --resume

    # --- state -----------------------------------------------------------------------------------
    @property
    def best(self):
        return state_from_rows(self.rows)[0]

    def sigma(self):
        return pooled_sigma(noise_groups(self.rows))

    def allowance(self):
        return budget_allowance(self.args.time_budget)

    def phase(self):
        i = phase_index([r["status"] for r in self.rows], len(self.phases), self.args.phase_every,
                        self.args.phase_plateau)
        return self.phases[i]

    def done(self):
        """Model experiments that ran to a verdict (interrupted ones don't count against --max-experiments)."""
        return sum(r["status"] not in ("baseline", "interrupted") for r in self.rows)

    def next_exp(self):
        return max([int(r["experiment"]) for r in self.rows], default=-1) + 1

    def outcome(self, exp, **fields):
        """A new experiment's Outcome, by this loop's agent. Every experiment is a round of its own (the baseline's
        is 0), on worker 0."""
        fields.setdefault("round", max((r["round"] for r in self.rows), default=0) + 1)
        return Outcome(exp, agent=self.agent, time_budget=self.args.time_budget, **fields)

    def record(self, o):
        row = make_row(o, self.rows, self.metric, time.time())
        append_row(row, metric=self.metric)
        self.rows.append(row)

    def conclude(self, o):
        """The one ending of every experiment: a keep amends its candidate into the keep commit, anything else goes
        back to where it started (the scratchpad notes survive), and its row is recorded. The row comes after the
        keep commit and before the revert, so that a kill -9 anywhere leaves what --resume recovers it from."""
        if o.status == "keep":
            self.commit_keep(o)
        scratch = read_scratchpad()
        self.record(o)
        if o.status != "keep" and o.base:
            self.restore(o.base, scratch)
        self.cleanup_runs()
        say("autoresearch: " + decision_line(self.rows[-1], self.metric))

    # --- branch set-up and resume reconciliation ----------------------------------------------------
    def setup(self):
        os.makedirs("runs", exist_ok=True)
        stop_orphan()
        exists = git("rev-parse", "--verify", "-q", f"refs/heads/{self.branch}", check=False) != ""
        if not self.args.resume:
            if exists:
                raise HarnessError(f"branch {self.branch} already exists: pass --resume, or a new --tag")
            if load_results():
                raise HarnessError(f"{RESULTS} holds results of an earlier run: pass --resume --tag TAG, "
                                   f"or move it away (mv {RESULTS} results-old.tsv)")
            sweep_worktrees()
            git("checkout", "-q", "-b", self.branch)
            return
        if not exists:
            raise HarnessError(f"nothing to resume: branch {self.branch} does not exist (check --tag)")
        self.rows = [typed_row(r, self.metric) for r in load_results(metric=self.metric)]
        upgrade_results(self.metric)
        scratch = read_scratchpad()
        git("checkout", "-q", "-f", self.branch)
        head = git("rev-parse", "HEAD")
        _, target, _, _ = state_from_rows(self.rows)
        round_start = None   # the notes a recovered round started from
        if target and head != target:
            tr = parse_trailers(git("log", "-1", "--format=%B", head))
            exp = tr.get("Experiment", "")
            if exp.isdigit() and int(exp) not in {r["experiment"] for r in self.rows}:
                where = {k.lower(): int(tr[k]) for k in ("Round", "Worker") if tr.get(k, "").isdigit()}
                o = self.outcome(int(exp), commit=head, description=tr.get("Hypothesis", ""), phase=tr.get("Phase", ""),
                                 **where)
                if tr.get("Status") == "keep":
                    # killed after the keep commit, before its row (in the second seed's run, or just after it): the
                    # commit carries the result, decided on its first run
                    o.values, o.delta, o.threshold = runs_of({"runs": tr.get("Runs")}), num(tr.get("Delta")), \
                        num(tr.get("Threshold"))
                    o.status, o.reason = "keep", f"recovered from the keep commit on resume ({len(o.values)} run(s))"
                    self.record(o)
                    round_start = git("show", f"{target}:{SCRATCHPAD}", check=False)
                    target = head
                elif tr.get("Status") == "candidate":
                    o.base, o.reason = target, "killed during the run; recovered on resume"
                    self.record(o)
        notes = self.recover_workers(target)
        git("reset", "-q", "--hard", target or "HEAD")   # drop half-done edits; the notes are restored below
        if scratch is not None:
            self.save_notes(scratch, "notes recovered on resume")
        if notes:   # onto the notes the round started from: a recovered winner's own are in its keep commit
            base = read_scratchpad() if round_start is None else round_start
            self.save_notes(merge_scratchpads(base or "", notes), "notes of workers recovered on resume")
        sweep_worktrees()
        self.cleanup_runs()    # hand-offs of runs that were cut short
        say(f"autoresearch: resuming {self.branch} with {len(self.rows)} recorded experiments")

    def recover_workers(self, base):
        """--resume after a kill -9 in a round: each worker's candidate commit (in its worktree) that has no row is
        recorded interrupted. Returns every worker's notes ({experiment, or the worker where it made no candidate:
        its scratchpad}); sweep_worktrees removes the worktrees afterwards."""
        notes = {}
        for d in sorted(os.listdir(WORKTREES)) if os.path.isdir(WORKTREES) else []:
            path = os.path.join(WORKTREES, d)
            head = git("rev-parse", "HEAD", cwd=path, check=False) if os.path.exists(os.path.join(path, ".git")) else ""
            tr = parse_trailers(git("log", "-1", "--format=%B", head, cwd=path)) if head else {}
            exp = tr.get("Experiment", "")
            cand = exp.isdigit() and tr.get("Status") == "candidate"
            if cand and int(exp) not in {r["experiment"] for r in self.rows}:
                o = self.outcome(int(exp), commit=head, description=tr.get("Hypothesis", ""), phase=tr.get("Phase", ""),
                                 base=base, round=int(tr.get("Round", 0)), worker=int(tr.get("Worker", 0)),
                                 reason="killed during the run; recovered on resume")
                self.record(o)
            if os.path.exists(os.path.join(path, SCRATCHPAD)):
                notes[exp if cand else f"? (worker {d[1:]}, stopped before its run)"] = read_text(
                    os.path.join(path, SCRATCHPAD))
        return notes

    def save_notes(self, scratch, why):
        """scratchpad.md survives reverts: write it back and commit it on its own."""
        if scratch is None or not os.path.exists(SCRATCHPAD) or read_text(SCRATCHPAD) == scratch:
            return
        write_text(SCRATCHPAD, scratch)
        git("add", SCRATCHPAD)
        git("commit", "-q", "--no-verify", "-m", f"scratchpad: {why}")

    def restore(self, base, scratch):
        git("reset", "-q", "--hard", base)
        self.save_notes(scratch, "notes kept across a revert")

    def cleanup_runs(self):
        """Hand-offs are kept for the baseline and the best (report --test), and a baseline's that --resume continues."""
        _, _, best_exp, base_exp = state_from_rows(self.rows)
        pending = pending_baseline(self.rows)
        keep = {f"runs/{best_exp}", f"runs/{base_exp}", f"runs/{pending and pending['experiment']}"}
        if os.path.isdir("runs"):
            for d in os.listdir("runs"):
                if f"runs/{d}" not in keep and re.fullmatch(r"\d+(-s\d+)?", d):
                    shutil.rmtree(f"runs/{d}", ignore_errors=True)

    # --- one model conversation ----------------------------------------------------------------------
    def chat(self, messages, o):
        self.fit_context(messages)
        for attempt in range(4):
            t0 = time.time()
            try:
                r = self.client.chat(model=self.args.model, messages=messages, tools=TOOLS,
                                     options={"num_ctx": self.args.num_ctx, "temperature": self.args.temperature},
                                     keep_alive="30m")
                break
            except Exception as e:  # noqa: BLE001
                o.model_seconds += time.time() - t0
                if attempt == 3 or not is_transient(e):
                    raise HarnessError(f"Ollama request failed: {ollama_error(e)}; fix it, then continue "
                                       f"with --resume --tag {self.args.tag}")
                say(f"autoresearch: Ollama request failed ({ollama_error(e)}), retrying")
                time.sleep(2 * (attempt + 1))
        o.model_seconds += time.time() - t0
        used = r.prompt_eval_count or 0
        o.prompt_tokens = max(o.prompt_tokens, used)
        if used:
            self.chars_per_token = max(1.5, sum(len(str(m.get("content", ""))) for m in messages) / used)
        if used >= self.args.num_ctx - 16:
            say(f"autoresearch: WARNING: prompt used {used} of {self.args.num_ctx} tokens; it may be truncated")
        msg = r.message
        calls = []
        for tc in msg.tool_calls or []:
            calls.append({"function": {"name": tc.function.name, "arguments": dict(tc.function.arguments or {})}})
        return msg.content or "", calls

    def tokens(self, messages):
        return sum(len(str(m.get("content", ""))) for m in messages) / self.chars_per_token + 300

    def fit_context(self, messages):
        """Elide older tool results before Ollama would silently truncate the prompt."""
        budget = self.args.num_ctx * (1 - TOKEN_RESERVE)
        for m in messages[2:-2]:
            if self.tokens(messages) <= budget:
                return
            if m["role"] == "tool" and len(m["content"]) > 200:
                m["content"] = m["content"][:200] + "\n[... elided to save context ...]"

    def converse(self, messages, o, base_src):
        """Let the model use tools until it calls run_experiment acceptably. ('run', desc) or ('invalid', why)."""
        a = self.args
        nudges = calls_made = bad_runs = 0
        for _ in range(a.max_turns):
            content, native = self.chat(messages, o)
            calls = parse_tool_calls(content, native)
            entry = {"role": "assistant", "content": content}
            if native:
                entry["tool_calls"] = native
            messages.append(encodable(entry))   # the reply goes back in the next request: no lone surrogate
            if not calls:
                nudges += 1
                if nudges > a.max_nudges:
                    return "invalid", "no tool call after repeated nudges"
                messages.append({"role": "user", "content":
                                 "You did not call a tool. Call edit_file to change train.py, then "
                                 "run_experiment(description). Reply with a tool call only."})
                continue
            for name, targs in calls:
                calls_made += 1
                if calls_made > a.max_tool_calls:
                    return "invalid", f"more than {a.max_tool_calls} tool calls"
                why = unwritable(targs)
                if why:
                    result = f"ERROR: {why}"
                elif name == "run_experiment":
                    why = self.prerun_check(base_src)
                    if not why:
                        return "run", clean_text(targs.get("description") or "no description given")
                    bad_runs += 1
                    if bad_runs > a.max_invalid:
                        return "invalid", why
                    result = f"ERROR: cannot run: {why}"
                else:
                    result = self.tool(name, targs)
                messages.append({"role": "tool", "content": result[:TOOL_RESULT_MAX], "tool_name": name})
        return "invalid", f"no run_experiment within {a.max_turns} turns"

    def tool(self, name, targs):
        """read_file or edit_file. Whatever goes wrong in one is the model's error message, never the loop's end."""
        try:
            if name == "read_file":
                return self.tool_read(targs.get("path"))
            return self.tool_edit(targs.get("path"), targs.get("old_text"), targs.get("new_text"))
        except Exception as e:  # noqa: BLE001
            return f"ERROR: {type(e).__name__}: {clean_text(e, 300)}"

    def tool_read(self, path):
        allowed = READABLE | ({self.last_log} if self.last_log else set())
        rel, err = check_path(".", path, allowed)
        if not err and rel in EDITABLE:
            _, err = check_path(self.root, rel, EDITABLE)
        if err:
            return f"ERROR: {err}"
        full = os.path.join(self.root, rel) if rel in EDITABLE else rel
        if not os.path.exists(full):
            return f"ERROR: {rel} does not exist yet"
        text = read_text(full)
        if rel == PROGRAM:   # as in the system prompt
            text = fill_metric(text, self.metric)
        if rel.startswith("logs/"):
            text = "\n".join(text.split("\n")[-150:])
        return text[-READ_MAX_CHARS:]

    def tool_edit(self, path, old, new):
        rel, err = check_path(self.root, path, EDITABLE)
        if err:
            return f"ERROR: {err}"
        text, err = apply_edit(read_text(os.path.join(self.root, rel)), old, new)
        if err:
            return f"ERROR: {err}"
        limit = SCRATCHPAD_MAX_CHARS if rel == SCRATCHPAD else self.train_limit
        if len(text) > limit:
            fix = ("condense older entries (replace them by a short summary) instead of adding" if rel == SCRATCHPAD
                   else "the whole file goes into every prompt beside program.md and the rules: make it shorter")
            return f"ERROR: {rel} would grow to {len(text)} characters, more than its limit of {limit}: {fix}"
        write_text(os.path.join(self.root, rel), text)
        why = parse_error(text) if rel == TRAIN else None
        note = f" WARNING: {why}; fix it before running." if why else ""
        return f"OK: edited {rel} ({len(text.splitlines())} lines).{note}"

    def prerun_check(self, base_src):
        src = read_text(os.path.join(self.root, TRAIN))
        why = parse_error(src)
        if why:
            return f"{why}; fix it with edit_file"
        if src == base_src:
            return "train.py is identical to the version already run; change it with edit_file first"
        other = [f for f in dirty_files(self.root) if f not in EDITABLE]
        if other:
            return f"only train.py and scratchpad.md may change, but also changed: {', '.join(other)}"
        return None

    def tune(self, o):
        """A tuner agent's turn: its next trial written into train.py, then run like the model's edit."""
        t0 = time.time()
        text, desc = self.tuner.next_edit(self.rows, read_text(os.path.join(self.root, TRAIN)))
        write_text(os.path.join(self.root, TRAIN), text)
        o.model_seconds += time.time() - t0
        return "run", desc

    def prestart(self, label, cwd=".", slot=None):
        """A candidate's run, started when its conversation opens (start_run(wait=True)); not under SLURM, where a
        job would hold its node while the model thinks."""
        if not on_slurm(self.args):
            return start_run(self.args, label, f"runs/{label}", 1, self.allowance(), cwd, slot or self.alone, wait=True)

    def run(self, label, seed, phase_short, allowance=None, started=None):
        """One run alone on the machine (the baseline's, a candidate's, a second seed)."""
        run = run_sandbox(self.args, label, f"runs/{label}", seed, phase_short, allowance, self.metric,
                          slot=self.alone, started=started)
        self.last_log = run.log
        return run

    # --- experiments ---------------------------------------------------------------------------------
    def baseline(self):
        """train.py as it is, --noise-runs times with seeds 1..K: the first best and the noise. However it stops (a failed
        seed, Ctrl-C), the seeds that finished are recorded (an interrupted row of round 0), and --resume runs only
        the missing ones, as long as the commit is the same."""
        a, head = self.args, git("rev-parse", "HEAD")
        o = self.outcome(self.next_exp(), round=0, description="baseline", phase=self.phases[0], commit=head,
                         started=time.time())
        prior = pending_baseline(self.rows)
        if prior and prior["commit"] == head:
            o.values, o.train_wall_seconds = list(prior["runs"]), prior["train_wall_seconds"]
            if os.path.isdir(f"runs/{prior['experiment']}"):   # seed 1's hand-off, for report --test
                os.replace(f"runs/{prior['experiment']}", f"runs/{o.experiment}")
        say(f"autoresearch: experiment {o.experiment}: baseline ({a.noise_runs} runs to measure the noise" +
            (f"; {len(o.values)} recorded by experiment {prior['experiment']})" if o.values else ")"))
        try:
            for k in range(len(o.values), a.noise_runs):
                run = self.run(str(o.experiment) if k == 0 else f"{o.experiment}-s{k + 1}", k + 1, "baseline")
                o.run_seconds += run.seconds
                if run.status != "ok":
                    raise HarnessError(baseline_failure(run, k + 1, o.values, o.train_wall_seconds, a.time_budget,
                                                        run_grace(None)) + f" Then continue: python autoresearch.py "
                                       f"--resume --tag {a.tag}\n{run.tail[-2000:]}")
                o.values.append(run.value)
                o.train_wall_seconds = max(o.train_wall_seconds or 0.0, run.metrics.get("train_wall_seconds", 0.0))
        except (KeyboardInterrupt, HarnessError) as e:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not break the clean-up
            o.reason = f"{len(o.values)} of {a.noise_runs} seeds, then " + (
                str(e).split("\n")[0] if isinstance(e, HarnessError) else "Ctrl-C / SIGTERM")
            self.conclude(o)
            raise
        o.status, o.delta, o.reason = "baseline", 0.0, f"{len(o.values)} seeds"
        self.conclude(o)
        over = o.train_wall_seconds - a.time_budget
        if over > self.allowance():
            say(f"autoresearch: WARNING: the baseline's training container ran {over:.0f}s past the {a.time_budget}s "
                f"budget (start-up, data loading, export), more than the {self.allowance():.0f}s a candidate may "
                f"(max({ALLOWANCE_SHARE:.0%} of the budget, {ALLOWANCE_MIN:g}s)): candidates like it will be recorded "
                f"invalid. A busy machine, or a start-up to shorten; a longer --time-budget allows more")

    def experiment(self):
        a = self.args
        phase = self.phase()
        o = self.outcome(self.next_exp(), phase=phase, base=git("rev-parse", "HEAD"), started=time.time())
        short = phase.split(":")[0]
        base_src = read_text(TRAIN)   # identical to HEAD: the tree is clean here
        best, sigma = self.best, self.sigma()
        run = None
        say(f"autoresearch: experiment {o.experiment} ({phase}); best {fmt(best)}")
        label = str(o.experiment)
        started = self.prestart(label)
        try:
            messages = [{"role": "system", "content": self.system},
                        {"role": "user", "content": self.user_message(base_src, best, sigma, phase)}]
            verdict, info = self.tune(o) if self.tuner else self.converse(messages, o, base_src)
            o.description = info if verdict == "run" else ""
            fixes = 0
            while verdict == "run":
                git("reset", "-q", "--soft", o.base)     # one candidate commit on top of best, even after fixes
                git("add", TRAIN, SCRATCHPAD)
                git("commit", "-q", "--no-verify", "--allow-empty", "-m",
                    commit_message(o.experiment, o.description, phase, "candidate"))
                o.commit = git("rev-parse", "HEAD")
                run = self.run(label, 1, short, self.allowance(), started)
                started = None
                o.run_seconds += run.seconds
                if run.status != "crash" or fixes >= a.fix_attempts:
                    break
                fixes += 1
                say(f"autoresearch: experiment {o.experiment} crashed ({run.reason}); fix attempt "
                    f"{fixes}/{a.fix_attempts}")
                messages.append({"role": "user", "content":
                                 f"The run crashed ({run.reason}). Last lines of {run.log}:\n```\n{run.tail[-3000:]}\n"
                                 f"```\nFix the bug in train.py with edit_file (keep the idea), then call "
                                 f"run_experiment again."})
                verdict, info = self.converse(messages, o, read_text(TRAIN))
            if run is None:
                o.status, o.description, o.reason = "invalid", "(no valid run)", info
            elif run.status != "ok":
                o.status, o.reason = run.status, run.reason
            else:
                o.values, o.train_wall_seconds = [run.value], run.metrics.get("train_wall_seconds")
                o.status, o.delta, o.threshold, o.reason = decide(o.values, best, sigma, a.z, a.floor, a.confirm,
                                                                  self.metric)
                self.second_seed(o, best, sigma, a.z, short)
        except (KeyboardInterrupt, HarnessError) as e:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not break the clean-up
            if o.status != "keep":   # a keep in its second seed's run stays a keep (second_seed)
                o.status, o.reason = "interrupted", str(e) or "Ctrl-C / SIGTERM"
            self.conclude(o)
            raise
        finally:
            cancel_run(label, started)   # no run_experiment: its run never got its go
        self.conclude(o)

    def second_seed(self, o, best, sigma, z, short):
        """The candidate at HEAD, decided on its first run. A keep is decided there: the second seed only refines
        best and sigma (repeated to re-estimate sigma and de-bias best), so the keep is committed before that run,
        and Ctrl-C or kill -9 during it keeps the gain (on one run) instead of losing it. A confirm needs a second
        seed that agrees."""
        a = self.args
        pending_keep = o.status == "keep" and a.noise_runs >= 2
        if pending_keep:
            self.commit_keep(o)
        elif o.status != "confirm":
            return
        try:
            rep = self.run(f"{o.experiment}-s2", 2, short, self.allowance())
        except (KeyboardInterrupt, HarnessError):
            if pending_keep:
                o.reason += ", second seed interrupted"
            raise
        o.run_seconds += rep.seconds
        if rep.status == "ok":
            o.values.append(rep.value)
            if o.status == "confirm":
                o.status, o.delta, o.threshold, o.reason = decide(o.values, best, sigma, z, a.floor, a.confirm,
                                                                  self.metric)
        elif o.status == "confirm":
            o.status, o.reason = "discard", o.reason + f", confirm run failed ({rep.status})"

    # --- rounds (--workers N) ------------------------------------------------------------------------
    def round(self, n):
        """n candidates from the same best commit: worker k proposes in its own worktree (a fresh conversation that
        lists what the round's earlier workers proposed) and trains in its own slot, in a thread, while the model
        already talks to worker k+1. At the end, decide_round against the round's starting best with the z for the
        best of n (sidak_z): at most one is kept (second seed as in experiment()), the others that pass are
        discarded as beaten, and every worker's notes reach scratchpad.md (merge_scratchpads)."""
        a, phase = self.args, self.phase()
        short, base, base_src, start_notes = phase.split(":")[0], git("rev-parse", "HEAD"), read_text(TRAIN), \
            read_scratchpad() or ""
        best, sigma, z = self.best, self.sigma(), sidak_z(a.z, n)
        rnd, first = max(r["round"] for r in self.rows) + 1, self.next_exp()
        cancel, workers, settling = threading.Event(), [], None
        say(f"autoresearch: round {rnd}: experiments {first}-{first + n - 1} ({phase}); best {fmt(best)}; "
            f"z {z:.3g} for the best of {n}")
        try:
            for k in range(n):
                w = Worker(k, worktree(k, base), self.slots[k], self.outcome(
                    first + k, round=rnd, worker=k, phase=phase, base=base, started=time.time()))
                workers.append(w)
                label = str(w.o.experiment)
                w.started = self.prestart(label, w.path, w.slot)
                others = [x.o.description for x in workers if x.o.description]
                w.messages = [{"role": "system", "content": self.system},
                              {"role": "user", "content": self.user_message(base_src, best, sigma, phase, others, z)}]
                self.propose(w, base_src, cancel)
            queue = [w for w in workers if w.thread]
            while queue:   # in worker order, so that the model's fix conversations come in a fixed order
                w = queue.pop(0)
                w.thread.join()
                if w.error:
                    raise w.error
                self.last_log = w.run.log
                if w.run.status == "crash" and w.fixes < a.fix_attempts:
                    w.fixes += 1
                    say(f"autoresearch: experiment {w.o.experiment} crashed ({w.run.reason}); fix attempt "
                        f"{w.fixes}/{a.fix_attempts}")
                    w.messages.append({"role": "user", "content":
                                       f"The run crashed ({w.run.reason}). Last lines of {w.run.log}:\n```\n"
                                       f"{w.run.tail[-3000:]}\n```\nFix the bug in train.py with edit_file (keep the "
                                       f"idea), then call run_experiment again."})
                    self.propose(w, read_text(os.path.join(w.path, TRAIN)), cancel)
                    queue += [w] if w.thread else []
            ok = {w.o.experiment: w.run.value for w in workers if w.run and w.run.status == "ok"}
            winner, verdicts = decide_round(best, sigma, ok, z, a.floor, a.confirm, self.metric)
            for w in workers:
                o, run = w.o, w.run
                if run and run.status != "ok":
                    o.status, o.reason = run.status, run.reason
                elif run:
                    o.values, o.train_wall_seconds = [run.value], run.metrics.get("train_wall_seconds")
                    o.status, o.delta, o.threshold, o.reason = verdicts[o.experiment]
            notes = self.round_notes(start_notes, workers)
            for w in workers:
                if w.o.experiment != winner:
                    self.conclude(w.o)   # this checkout is still on the round's base: only the row
                    w.concluded = True
            if winner is not None:
                w = workers[winner - first]
                git("reset", "-q", "--hard", w.o.commit)   # the winner's candidate at HEAD, as in experiment(); a
                settling = w                               # kill -9 from here on: recover_workers has the notes
                self.second_seed(w.o, best, sigma, z, short)
                self.conclude(w.o)
                w.concluded = True
            self.save_notes(notes, f"notes of round {rnd}")
        except (KeyboardInterrupt, HarnessError) as e:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not break the clean-up
            cancel.set()                                    # every run in flight stops, recorded interrupted
            for w in workers:
                if w.thread:
                    w.thread.join()
            notes = self.round_notes(start_notes, workers)
            for w in workers:
                cancel_run(str(w.o.experiment), w.started)
                if not w.concluded:
                    if w is not settling or w.o.status != "keep":   # a keep in its second seed stays a keep
                        w.o.status, w.o.reason = "interrupted", str(e) or "Ctrl-C / SIGTERM"
                    self.conclude(w.o)
            self.save_notes(notes, f"notes of round {rnd}")
            raise

    def propose(self, w, base_src, cancel):
        """Worker w's turn with the model (the tools act on its worktree); a run_experiment commits its candidate
        there and starts its run in a thread."""
        self.root = w.path
        try:
            verdict, info = self.tune(w.o) if self.tuner else self.converse(w.messages, w.o, base_src)
        finally:
            self.root = "."
        if verdict != "run":
            if w.run is None:
                w.o.status, w.o.description, w.o.reason = "invalid", "(no valid run)", info
            cancel_run(str(w.o.experiment), w.started)
            w.thread, w.started = None, None
            return
        w.o.description = info
        git("reset", "-q", "--soft", w.o.base, cwd=w.path)   # one candidate commit on top of best, even after fixes
        git("add", TRAIN, SCRATCHPAD, cwd=w.path)
        git("commit", "-q", "--no-verify", "--allow-empty", "-m", commit_message(
            w.o.experiment, w.o.description, w.o.phase, "candidate", extra={"Round": w.o.round, "Worker": w.o.worker},
            metric=self.metric), cwd=w.path)
        w.o.commit = git("rev-parse", "HEAD", cwd=w.path)
        label, allowance, started, w.started = str(w.o.experiment), self.allowance(), w.started, None

        def train():
            try:
                w.run = run_sandbox(self.args, label, f"runs/{label}", 1, w.o.phase.split(":")[0], allowance,
                                    self.metric, w.path, w.slot, cancel, started)
                w.o.run_seconds += w.run.seconds
            except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which raises it
                w.error = e
        w.thread = threading.Thread(target=train, name=f"worker-{w.index}", daemon=True)
        w.thread.start()

    def round_notes(self, notes, workers):
        """The round's scratchpad: its notes at the start, and every worker's new notes under its experiment."""
        return merge_scratchpads(notes, {w.o.experiment: read_text(os.path.join(w.path, SCRATCHPAD))
                                         for w in workers if os.path.exists(os.path.join(w.path, SCRATCHPAD))})

    def commit_keep(self, o):
        """Amend the candidate into the keep commit; its trailers let --resume record a keep whose row never got
        written."""
        trailers = {"Runs": cell(o.values), "Best": cell(sum(o.values) / len(o.values)), "Threshold": cell(o.threshold),
                    "Round": o.round, "Worker": o.worker}
        git("commit", "-q", "--no-verify", "--amend", "-m", commit_message(o.experiment, o.description, o.phase, "keep",
                                                                          o.values[0], o.delta, trailers, self.metric))
        o.commit = git("rev-parse", "HEAD")

    def user_message(self, train_src, best, sigma, phase, others=(), z=None):
        """The experiment's one user message; in a round: what its earlier workers proposed, and its z."""
        scratch = read_scratchpad() or ""
        also = "".join(f"\n- {d}" for d in others)
        also = also and ("\n\nOther workers of this round are already trying these changes, each on the same train.py; "
                         "make a different one:" + also)
        rows = [r for r in self.rows if r["status"] != "interrupted"]
        best_line = f"{self.metric.column} {fmt(best)} (noise sigma {fmt(sigma) or 'unknown'}; a change must beat it " \
                    f"by more than max({self.args.z if z is None else round(z, 3)}*sigma, {self.args.floor:.0%}))"
        budget = self.args.num_ctx * (1 - TOKEN_RESERVE)
        for max_rows, scratch_chars in ((15, SCRATCHPAD_MAX_CHARS), (8, 3000), (4, 1500), (2, 600)):
            msg = build_user_message(train_src, scratch, rows, best_line, phase, self.last_log, max_rows,
                                     scratch_chars, self.metric) + also
            if (len(msg) + len(self.system)) / self.chars_per_token + 300 <= budget:
                break
        return msg

    def main(self):
        self.setup()
        try:
            if not any(r["status"] == "baseline" for r in self.rows):
                self.baseline()
                write_report(self.rows, quiet=True, metric=self.metric)
            while not self.args.max_experiments or self.done() < self.args.max_experiments:
                left = self.args.max_experiments - self.done() if self.args.max_experiments else self.args.workers
                n = min(self.args.workers, left)
                self.round(n) if n > 1 else self.experiment()
                write_report(self.rows, quiet=True, metric=self.metric)
        except KeyboardInterrupt:
            if self.rows:
                write_report(self.rows, quiet=True, metric=self.metric)
            raise
        finally:
            if self.args.workers > 1:
                sweep_worktrees()
        write_report(self.rows, metric=self.metric)
        summary(self.rows, self.metric)
        report_test(self.rows, self.metric, self.args)


# ----------------------------------------------------------------------------------------------
# Report: progress.png, terminal summary, held-out test.

def round_of(row):
    """A row's round; rows of a harness before rounds were each their own."""
    rnd = num(row.get("round"))
    return int(rnd) if rnd is not None else f"exp {row['experiment']}"


def wall_seconds(rows):
    """Pure. Wall-clock seconds the rows took: per round, from the first start to the last end of its experiments (a
    round's workers overlap), summed over the rounds; a row without its end time counts on its own."""
    spans, alone = {}, 0.0
    for r in rows:
        took = num(r["wall_seconds"]) or 0.0
        if not r.get("finished"):
            alone += took
            continue
        end = datetime.datetime.fromisoformat(r["finished"]).timestamp()
        lo, hi = spans.get(round_of(r), (end - took, end))
        spans[round_of(r)] = (min(lo, end - took), max(hi, end))
    return alone + sum(hi - lo for lo, hi in spans.values())


def summarize(rows):
    """Pure. Figures for the terminal summary; slots: each worker's training seconds over the wall seconds."""
    base = next((r for r in rows if r["status"] == "baseline"), None)
    if not base:
        return None
    best, _, best_exp, _ = state_from_rows(rows)
    model_rows = [r for r in rows if r["status"] not in ("baseline", "interrupted")]
    keeps = sum(r["status"] == "keep" for r in model_rows)
    wall = wall_seconds(rows)
    train = sum(num(r["run_seconds"]) or 0 for r in rows)
    slots = {}
    for r in rows:
        k = int(num(r.get("worker")) or 0)
        slots[k] = slots.get(k, 0.0) + (num(r["run_seconds"]) or 0)
    model = sum(num(r["model_seconds"]) or 0 for r in rows)
    b = num(base["best"])
    return {"baseline": b, "baseline_runs": len(runs_of(base)), "best": best, "best_exp": best_exp,
            "delta_pct": (best - b) / b * 100 if b else 0.0, "experiments": len(model_rows), "keeps": keeps,
            "keep_rate": keeps / len(model_rows) if model_rows else 0.0,
            "per_hour": len(model_rows) / (wall / 3600) if wall else 0.0,
            "train_share": train / wall if wall else 0.0, "model_share": model / wall if wall else 0.0,
            "crashes": sum(r["status"] in ("crash", "timeout") for r in model_rows),
            "slots": {k: v / wall if wall else 0.0 for k, v in slots.items()}}


def summary(rows, metric):
    s = summarize(rows)
    if not s:
        print("autoresearch: no baseline recorded yet")
        return
    print(f"{metric.column} ({metric.better} is better): baseline {s['baseline']:.4g} (the mean of its "
          f"{s['baseline_runs']} runs) -> best {s['best']:.4g} (exp {s['best_exp']}), {s['delta_pct']:+.1f}%")
    print(f"{s['experiments']} experiments, {s['keeps']} kept ({s['keep_rate']:.0%}), {s['crashes']} crashed/"
          f"timed out, {s['per_hour']:.1f} experiments/hour")
    if len(s["slots"]) > 1:   # workers overlap: the shares below add up to more than the wall time
        print("slot utilization (training seconds / wall seconds): " +
              ", ".join(f"worker {k} {v:.0%}" for k, v in sorted(s["slots"].items())))
    print(f"wall time: {s['train_share']:.0%} training+evaluation, {s['model_share']:.0%} waiting for the model, "
          f"{max(0.0, 1 - s['train_share'] - s['model_share']):.0%} harness")


def write_report(rows, path="progress.png", quiet=False, metric=None):
    """Dots per experiment (grey discarded, green kept + labelled, red x crashes at the worse end), running best with
    noise band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    metric = metric or project_metric()
    pts = [(int(r["experiment"]), num(r[metric.column]), r) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    rounds = {}
    for x, _, r in pts:
        rounds.setdefault(round_of(r), []).append(x)
    if any(len(xs) > 1 for xs in rounds.values()):   # --workers: every other round shaded
        spans = sorted((min(xs), max(xs)) for xs in rounds.values())
        for i, (lo, hi) in enumerate(spans[1::2]):
            ax.axvspan(lo - 0.5, hi + 0.5, color="#1f77b4", alpha=0.07, lw=0, label=None if i else "a round (shaded "
                       "every other)", zorder=0)
    dis = [(x, y) for x, y, r in pts if y is not None and r["status"] == "discard"]
    if dis:
        ax.scatter(*zip(*dis), c="#b0b0b0", s=22, label="discarded", zorder=2)
    kept = [(x, y, r) for x, y, r in pts if y is not None and r["status"] in ("keep", "baseline")]
    if kept:
        ax.scatter([k[0] for k in kept], [k[1] for k in kept], c="#2ca02c", s=40, label="kept", zorder=3)
        for x, y, r in kept:
            ax.annotate(r["description"][:40], (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7,
                        color="#1b6e1b", rotation=20)
    ys = [y for _, y, _ in pts if y is not None]
    fails = [(x, r) for x, y, r in pts if r["status"] in ("crash", "timeout", "invalid")]
    if fails:
        worst = (max if metric.direction == "minimize" else min)(ys) if ys else 1.0
        ax.scatter([f[0] for f in fails], [worst] * len(fails), marker="x", c="#d62728", s=36,
                   label="crash / timeout / invalid", zorder=3)
    # the band uses the sigma known after each row (it is re-estimated as kept experiments add repeats)
    steps = [(x, num(r["best"]), pooled_sigma(noise_groups(rows[:i + 1])) or 0.0)
             for i, (x, _, r) in enumerate(pts) if num(r["best"]) is not None]
    if steps:
        xs = [s[0] for s in steps] + [max(x for x, _, _ in pts)]
        bs = [s[1] for s in steps] + [steps[-1][1]]
        band = [2 * s[2] for s in steps] + [2 * steps[-1][2]]
        ax.step(xs, bs, where="post", c="#1b6e1b", lw=1.5, label="running best")   # darker than the kept dots on it
        ax.fill_between(xs, [b - w for b, w in zip(bs, band)], [b + w for b, w in zip(bs, band)], step="post",
                        color="#2ca02c", alpha=0.12, label="noise band (±2σ)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("experiment")
    ax.set_ylabel(f"{metric.column} ({metric.better} is better)")
    s = summarize(rows)
    title = "autoresearch progress"
    if s:
        title += (f": {s['baseline']:.4g} → {s['best']:.4g} ({s['delta_pct']:+.1f}%), "
                  f"{s['keeps']}/{s['experiments']} kept")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")


def report_test(rows, metric, args=None):
    """Evaluate the baseline and the best hand-off on the held-out test split: once per commit (test_scores.tsv keeps
    each score; a commit scored before is shown, not scored again), run.sh's own reason where it fails."""
    _, _, best_exp, base_exp = state_from_rows(rows)
    if base_exp is None:
        print("autoresearch: no baseline recorded yet; nothing to test")
        return 1
    vals = {r["experiment"]: r for r in rows}
    key = f"test_{metric.name}"
    scores = load_test_scores(metric)
    print(f"{'':<16}{metric.column:>15}{key:>16}")
    rc = 0
    for name, exp in (("baseline", base_exp), (f"best (exp {best_exp})", best_exp)):
        commit, run_dir = vals[exp]["commit"], f"runs/{exp}"
        test, why = scores.get(commit), ""
        if test is None and not os.path.isdir(run_dir):
            why = f"no hand-off in {run_dir}"
        elif test is None:
            p = spawn(launch_argv(args, f"test-{exp}", ["./run.sh", "--test", run_dir]), timeout=1800,
                      stdin=subprocess.DEVNULL)
            test = parse_metrics(p.stdout).get(key)
            if test is None:
                said = [line for line in (p.stdout + p.stderr).split("\n") if line.strip()]
                own = [line[8:] for line in said if line.startswith("run.sh: ")]
                why = f"run.sh exit {p.returncode}: {(own or said or ['no output'])[-1]}"
            else:
                record_test_score(commit, test, metric)
        print(f"{name:<16}{fmt(num(vals[exp]['best'])):>15}{fmt(test) or 'failed':>16}")
        if why:
            print(f"  {name}: {why}")
            rc = 1
        if exp == best_exp == base_exp:
            break
    return rc


def record_test_score(commit, value, metric, path=TEST_SCORES):
    """Add a commit's test score to test_scores.tsv (report --compare shows it later). A file of another metric is
    set aside as test_scores-<its column>.tsv, and a new one started."""
    header = f"commit\ttest_{metric.name}\tfinished\n"
    old = read_text(path) if os.path.exists(path) else header
    if not old.startswith(header):
        column = old.split("\n", 1)[0].split("\t")[1:2] or ["old"]
        os.replace(path, f"test_scores-{column[0]}.tsv")
        old = header
    write_text(path, old + f"{commit}\t{value!r}\t{datetime.datetime.now().isoformat(timespec='seconds')}\n")


def load_test_scores(metric, path=TEST_SCORES):
    """{commit: its latest test score} of this metric."""
    if not os.path.exists(path) or not read_text(path).startswith(f"commit\ttest_{metric.name}\t"):
        return {}
    cells = [line.split("\t") for line in read_text(path).split("\n")[1:]]
    return {c[0]: num(c[1]) for c in cells if len(c) >= 2 and num(c[1]) is not None}


def best_so_far(rows):
    """Pure. [(experiment, wall-clock hours so far, running best)] of the rows that recorded a running best."""
    out, hours = [], 0.0
    for r in rows:
        hours += (num(r.get("wall_seconds")) or 0.0) / 3600
        if num(r["best"]) is not None:
            out.append((int(r["experiment"]), hours, num(r["best"])))
    return out


def compare_line(rows, scores, metric=None):
    """Pure. One run's figures for report --compare. A keep "survived" when its second-seed run alone also beat
    the best before it by the recorded threshold; keeps without a second run (--noise-runs 1) are not counted."""
    metric = metric or project_metric()
    s = summarize(rows)
    _, best_commit, _, _ = state_from_rows(rows)
    checked = survived = 0
    for i, r in enumerate(rows):
        runs = runs_of(r)
        before = next((num(p["best"]) for p in reversed(rows[:i]) if num(p["best"]) is not None), None)
        if r["status"] == "keep" and len(runs) >= 2 and before is not None and num(r["threshold"]) is not None:
            checked += 1
            survived += metric.gain(runs[1], before) > num(r["threshold"])
    return {"agent": next((r["agent"] for r in reversed(rows) if r.get("agent")), "llm"), "best": s["best"],
            "test": scores.get(best_commit), "experiments": s["experiments"], "keeps": s["keeps"],
            "per_hour": s["per_hour"], "survived": survived, "checked": checked}


def run_results(name, metric):
    """A run to compare: NAME.tsv is a results file; a tag is results.tsv while its branch is checked out, else
    results-TAG.tsv (where `mv results.tsv results-TAG.tsv` puts a finished run before the next one starts)."""
    path = name if name.endswith(".tsv") else RESULTS if name == current_tag() else f"results-{name}.tsv"
    if not os.path.exists(path):
        raise HarnessError(f"no results for {name!r}: {path} does not exist (after a run, keep its results with "
                           f"mv {RESULTS} results-TAG.tsv; or pass a results file ending in .tsv)")
    rows = load_results(path, metric=metric)
    if summarize(rows) is None:
        raise HarnessError(f"{path} has no baseline yet: nothing to compare")
    return rows


def write_compare(runs, scores, metric, path="compare.png"):
    """Running best against experiment number (left) and wall-clock hours (right), one colour per run; a star
    marks the best commit's test score where it has been evaluated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110, sharey=True)
    for i, (name, rows) in enumerate(runs):
        pts, line = best_so_far(rows), compare_line(rows, scores, metric)
        label = f"{name} ({line['agent']}): best {line['best']:.4g}" + (
            f", test {line['test']:.4g}" if line["test"] is not None else "")
        for ax, x in ((axes[0], [p[0] for p in pts]), (axes[1], [p[1] for p in pts])):
            ax.step(x, [p[2] for p in pts], where="post", color=f"C{i}", lw=2, label=label)
            if line["test"] is not None:
                ax.scatter([x[-1]], [line["test"]], marker="*", s=160, color=f"C{i}", edgecolors="black", zorder=3)
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_xlabel("experiment")
    axes[1].set_xlabel("wall-clock hours")
    axes[0].set_ylabel(f"best {metric.column} so far ({metric.better} is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8, framealpha=0.8)
    fig.suptitle("autoresearch runs compared (★ = the best commit on the test split)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def compare(names, metric):
    runs = [(n, run_results(n, metric)) for n in names]
    scores = load_test_scores(metric)
    write_compare(runs, scores, metric)
    print(f"{'run':<16}{'agent':<8}{'experiments':>12}{'best val':>10}{'its test':>10}{'keeps':>7}{'exp/hour':>10}"
          f"  keeps confirmed by a 2nd seed")
    for name, rows in runs:
        c = compare_line(rows, scores, metric)
        print(f"{name[:15]:<16}{c['agent']:<8}{c['experiments']:>12}{c['best']:>10.4g}{fmt(c['test']) or '-':>10}"
              f"{c['keeps']:>7}{c['per_hour']:>10.1f}  " + (f"{c['survived']}/{c['checked']}" if c["checked"] else "-"))
    return 0


def report(args):
    """`report`: progress.png and the summary of this run (--test: also baseline and best on test);
    `report --compare`: compare.png and a table for several runs."""
    metric = project_metric()
    if args.compare:
        return compare(args.compare, metric)
    rows = load_results(metric=metric)
    if not rows:
        raise HarnessError(f"no {RESULTS} here yet: run python autoresearch.py first")
    write_report(rows, metric=metric)
    summary(rows, metric)
    return report_test(rows, metric) if args.test else 0


def make_tuner(args, metric):
    """The tuner of --agent optuna|random over the search space of the run's baseline commit (a resumed run
    keeps its space). The active preset is the one train.py picks: cuda iff torch sees a GPU."""
    base = next((r["commit"] for r in load_results() if r["status"] == "baseline"), None) if args.resume else None
    if base:
        train_src, program = git("show", f"{base}:{TRAIN}"), git("show", f"{base}:{PROGRAM}")
    else:
        train_src, program = read_text(TRAIN), read_text(PROGRAM)
    import torch
    return Tuner(args.agent, train_src, program, torch.cuda.is_available(), args.tuner_seed, metric)


# ----------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A wrong flag is one line, as every other mistake (no usage block)."""
        self.exit(2, f"{self.prog}: error: {message} (python autoresearch.py --help lists the flags)\n")


def build_parser():
    p = Parser(prog="autoresearch.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Ollama model (a 7B coder fits next to training on 24 GB)")
    p.add_argument("--host", default=os.environ.get("OLLAMA_HOST") or DEFAULT_HOST, help="Ollama server")
    p.add_argument("--tag", default=None, help="run on branch autoresearch/TAG; default: today's date, e.g. nov27 (with --resume: the current branch)")
    p.add_argument("--max-experiments", type=int, default=0, help="model experiments after the baseline, "
                   "counted across resumes, interrupted ones excepted; 0 = until stopped")
    p.add_argument("--resume", action="store_true", help="continue from results.tsv and the branch")
    p.add_argument("--num-ctx", type=int, default=16384, help="context size sent on every Ollama request")
    p.add_argument("--time-budget", type=int, default=None, help="training seconds per experiment; default: "
                   "$AUTORESEARCH_TIME_BUDGET if exported, else 300 (with --resume: the run's own)")
    p.add_argument("--noise-runs", type=int, default=5, help="baseline runs with different seeds to estimate "
                   "sigma; with >= 2, each keep is repeated once with another seed to re-estimate sigma")
    p.add_argument("--z", type=float, default=2.0, help="keep only if improvement > max(z*sigma, floor)")
    p.add_argument("--floor", type=float, default=0.01, help="minimum improvement, as a fraction of the best")
    p.add_argument("--confirm", action="store_true", help="keep only once a second run with another seed agrees")
    p.add_argument("--phase-every", type=int, default=10, help="advance the phase after N experiments in it")
    p.add_argument("--phase-plateau", type=int, default=5, help="... or after K experiments without a keep")
    p.add_argument("--fix-attempts", type=int, default=2, help="attempts to fix a crashing experiment")
    p.add_argument("--max-turns", type=int, default=12, help="model replies per experiment")
    p.add_argument("--max-tool-calls", type=int, default=24, help="tool calls per experiment")
    p.add_argument("--max-nudges", type=int, default=2, help="nudges for replies without a tool call")
    p.add_argument("--max-invalid", type=int, default=3, help="rejected run_experiment calls before `invalid`")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--request-timeout", type=float, default=900, help="seconds per Ollama request")
    p.add_argument("--serve", action="store_true", help="start `ollama serve` if Ollama is not reachable")
    p.add_argument("--agent", choices=("llm", "optuna", "random"), default=None,
                   help="who proposes each experiment: the Ollama model, Optuna's TPE or uniform random samples "
                        "over the search space (program.md's ## Search space, else train.py's constants); "
                        "default: llm, with --resume the run's own agent")
    p.add_argument("--tuner-seed", type=int, default=0, help="seed of the optuna and random agents")
    p.add_argument("--workers", type=int, default=1, help="experiments per round, each in its own git worktree and "
                   "slot (a GPU of $AUTORESEARCH_GPUS, or a share of the cores); at most one kept per round")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local", help="where runs execute: here, or "
                   "each as a SLURM job (srun; site options in $AUTORESEARCH_SLURM_ARGS; needs a shared filesystem)")
    sub = p.add_subparsers(dest="command", title="subcommand")
    rp = sub.add_parser("report", help="progress.png and a summary; see report -h")
    how = rp.add_mutually_exclusive_group()
    how.add_argument("--test", action="store_true", help="also evaluate baseline and best on the test split")
    how.add_argument("--compare", nargs="+", metavar="TAG", help="compare.png and a table for these runs: a tag "
                     "means results.tsv while its branch is checked out, else results-TAG.tsv; or a .tsv path")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    for flag, ok, need in (("--num-ctx", args.num_ctx >= 2048, "at least 2048"),
                           ("--noise-runs", args.noise_runs >= 1, "at least 1"),
                           ("--time-budget", args.time_budget is None or args.time_budget >= 1, "at least 1"),
                           ("--workers", args.workers >= 1, "at least 1"),
                           ("--max-experiments", args.max_experiments >= 0, "0 (no limit) or more")):
        if not ok:
            p.error(f"{flag} must be {need}, got {getattr(args, flag[2:].replace('-', '_'))}")
    return args


def run_budget(asked, rows):
    """Pure. The training budget: the one asked for (--time-budget, else $AUTORESEARCH_TIME_BUDGET), else a resumed
    run's own, else DEFAULT_BUDGET. A resumed run asked for another budget is refused: its results would not compare."""
    done = next((int(num(r["time_budget"])) for r in reversed(rows) if num(r.get("time_budget"))), None)
    if asked and done and asked != done:
        raise HarnessError(f"{RESULTS} was recorded with a {done}s time budget, not the {asked}s asked for (--time-budget "
                           f"or AUTORESEARCH_TIME_BUDGET): resume with --time-budget {done}, or start a new --tag")
    return asked or done or DEFAULT_BUDGET


def current_tag():
    branch = git("rev-parse", "--abbrev-ref", "HEAD", check=False)
    return branch.split("/", 1)[1] if branch.startswith("autoresearch/") else None


def git_identity():
    """Commits need an identity; fall back to a neutral one only where none is configured."""
    if not git("config", "user.email", check=False):
        for k in ("GIT_AUTHOR", "GIT_COMMITTER"):
            os.environ.setdefault(f"{k}_NAME", "autoresearch")
            os.environ.setdefault(f"{k}_EMAIL", "autoresearch@localhost")


def _sigterm(signum, frame):
    raise KeyboardInterrupt   # SIGTERM cleans up exactly like Ctrl-C


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _sigterm)
    # Started as a background job of a script, Python inherits SIGINT ignored; Ctrl-C must still stop us cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = parse_args(argv)
        if args.command == "report" and not args.test:
            return report(args)   # reads only: beside a running loop too
        check_environment()
        lock_repo()               # held until this process ends
        if args.command == "report":
            return report(args)
        if args.tag is None:
            args.tag = (current_tag() if args.resume else None) or datetime.date.today().strftime("%b%d").lower()
        if not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
            raise HarnessError("--tag may only use letters, digits, '.', '_' and '-'")
        git_identity()
        recorded = load_results() if args.resume else []
        if args.agent is None:   # a resumed run keeps its agent, and its budget
            args.agent = next((r["agent"] for r in reversed(recorded) if r.get("agent")), "llm")
        args.time_budget = run_budget(args.time_budget or env_int("AUTORESEARCH_TIME_BUDGET", None), recorded)
        if args.agent != "llm":
            args.fix_attempts = 0   # nobody to fix a crash: it is a failed trial
        client = make_client(args.host, args.request_timeout) if args.agent == "llm" else None
        startup_checks(args, client)
        if on_slurm(args):
            slurm_startup(args)
        if args.workers > 1 and args.agent != "llm":
            raise HarnessError(f"--agent {args.agent} proposes one trial at a time: run it with --workers 1")
        # under SLURM each job gets its own GPU (--gres) on whichever node runs it
        alone, slots = {}, [{}] * args.workers
        if not on_slurm(args):   # SLURM places each run with its own resources
            alone = run_memory(1, host_memory())
            if args.workers > 1:
                mem = run_memory(args.workers, host_memory())
                slots = [{**slot, **mem} for slot in worker_slots(args.workers, os.environ.get("AUTORESEARCH_GPUS"),
                                                                  gpu_count(), os.cpu_count())]
        loop = Loop(args, client, make_tuner(args, project_metric()) if args.agent != "llm" else None, slots, alone)
        loop.main()
        return 0
    except HarnessError as e:
        live_clear()
        print(f"autoresearch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        live_clear()
        print("\nautoresearch: interrupted; the best commit is checked out. Continue with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
