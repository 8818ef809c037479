"""The LLM agent: the tools it acts through, its prompts, and the Ollama client it talks to."""
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import time

from engine.project import project_metric
from engine.repo import spawn
from engine.settings import DEFAULT_MODEL
from engine.util import HarnessError, PROGRAM, RESULTS, SCRATCHPAD, TRAIN, fmt, read_text, say


READABLE = {TRAIN, PROGRAM, SCRATCHPAD, RESULTS}       # + the last run's log, added at run time


EDITABLE = {TRAIN, SCRATCHPAD}


SCRATCHPAD_MAX_CHARS = 4000       # the agent must condense its notes beyond this


READ_MAX_CHARS = 20000


TOOL_RESULT_MAX = 8000


TOKEN_RESERVE = 0.25              # share of num_ctx left for tool results and the answer


CHARS_PER_TOKEN = 3.0             # for train.py's size limit: below what code tokenizes to (about 3.5)


PROMPT_OTHER_CHARS = 3000          # the least the first prompt holds beside train.py and the system prompt: the tool


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


def read_scratchpad():
    """scratchpad.md's notes, None where the project has none."""
    return read_text(SCRATCHPAD) if os.path.exists(SCRATCHPAD) else None


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
