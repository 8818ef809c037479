"""The LLM agent: the tools it acts through, its prompts, and the Ollama client it talks to."""
import ast
import difflib
import json
import math
import os
import re
import shutil
import subprocess
import time

from engine.repo import dirty_files, spawn
from engine.settings import DEFAULT_MODEL
from engine.util import (HarnessError, PROGRAM, RESULTS, SCRATCHPAD, TRAIN, clean_text, encodable, fmt, read_text,
    say, write_text)
from engine.verdicts import Status


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
        if s in (Status.BASELINE, Status.INTERRUPTED):
            continue
        in_phase += 1
        since_keep = 0 if s == Status.KEEP else since_keep + 1
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


def build_system_prompt(program_text, metric):
    return fill_metric(program_text.rstrip() + "\n\n" + TOOL_RULES.strip() + "\n", metric)


def build_user_message(metric, train_src, scratchpad, rows, best_line, phase_line, log_path=None, max_rows=15,
                       scratch_chars=SCRATCHPAD_MAX_CHARS):
    """Pure. The one user message of an experiment's fresh conversation."""
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


class LLMAgent:
    """The Ollama model as the proposer: a fresh conversation for each experiment (the system prompt: program.md and
    the rules; one user message: the state of the search and all of train.py), three tools, and what it did wrong
    said back to it. propose() ends at a run_experiment that may run, or at a reason it is invalid."""
    name = "llm"

    def __init__(self, args, client, metric, program):
        self.args, self.client, self.metric = args, client, metric
        self.system = build_system_prompt(program, metric)
        self.train_limit = train_limit(args.num_ctx, len(self.system))
        self.chars_per_token = 3.5           # calibrated from prompt_eval_count as replies come in
        size = len(read_text(TRAIN))
        if size > self.train_limit:
            need = math.ceil((size + len(self.system) + PROMPT_OTHER_CHARS) / ((1 - TOKEN_RESERVE) * CHARS_PER_TOKEN))
            raise HarnessError(f"{TRAIN} has {size} characters, more than fit in the model's context beside "
                               f"{PROGRAM} and the rules at --num-ctx {args.num_ctx} (at most "
                               f"{max(0, self.train_limit)}): pass --num-ctx {need} or more (the model must support it), "
                               f"or shorten {TRAIN}")

    def open(self, train_src, rows, best_line, phase, log, others=()):
        """A new conversation: the system prompt and the experiment's one user message, cut to fit the context (fewer
        results, older notes first); in a round, what its earlier workers proposed."""
        scratch = read_scratchpad() or ""
        also = "".join(f"\n- {d}" for d in others)
        also = also and ("\n\nOther workers of this round are already trying these changes, each on the same train.py; "
                         "make a different one:" + also)
        rows = [r for r in rows if r["status"] != Status.INTERRUPTED]
        budget = self.args.num_ctx * (1 - TOKEN_RESERVE)
        for max_rows, scratch_chars in ((15, SCRATCHPAD_MAX_CHARS), (8, 3000), (4, 1500), (2, 600)):
            msg = build_user_message(self.metric, train_src, scratch, rows, best_line, phase, log, max_rows,
                                     scratch_chars) + also
            if (len(msg) + len(self.system)) / self.chars_per_token + 300 <= budget:
                break
        return [{"role": "system", "content": self.system}, {"role": "user", "content": msg}]

    def propose(self, conv, o, root, base_src, rows, log):
        """The model's turn in `root` (the tools act there): ('run', description) or ('invalid', why)."""
        return self.converse(conv, o, root, base_src, log)

    def crashed(self, conv, run):
        """A run of its proposal crashed: the log's tail goes back to the model to fix the bug, keeping the idea."""
        conv.append({"role": "user", "content": f"The run crashed ({run.reason}). Last lines of {run.log}:\n```\n"
                     f"{run.tail[-3000:]}\n```\nFix the bug in train.py with edit_file (keep the idea), then call "
                     f"run_experiment again."})

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

    def converse(self, messages, o, root, base_src, log):
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
                    return Status.INVALID, "no tool call after repeated nudges"
                messages.append({"role": "user", "content":
                                 "You did not call a tool. Call edit_file to change train.py, then "
                                 "run_experiment(description). Reply with a tool call only."})
                continue
            for name, targs in calls:
                calls_made += 1
                if calls_made > a.max_tool_calls:
                    return Status.INVALID, f"more than {a.max_tool_calls} tool calls"
                why = unwritable(targs)
                if why:
                    result = f"ERROR: {why}"
                elif name == "run_experiment":
                    why = self.prerun_check(root, base_src)
                    if not why:
                        return "run", clean_text(targs.get("description") or "no description given")
                    bad_runs += 1
                    if bad_runs > a.max_invalid:
                        return Status.INVALID, why
                    result = f"ERROR: cannot run: {why}"
                else:
                    result = self.tool(root, log, name, targs)
                messages.append({"role": "tool", "content": result[:TOOL_RESULT_MAX], "tool_name": name})
        return Status.INVALID, f"no run_experiment within {a.max_turns} turns"

    def tool(self, root, log, name, targs):
        """read_file or edit_file in `root`. Whatever goes wrong in one is the model's error message, never the loop's
        end."""
        try:
            if name == "read_file":
                return self.tool_read(root, log, targs.get("path"))
            return self.tool_edit(root, targs.get("path"), targs.get("old_text"), targs.get("new_text"))
        except Exception as e:  # noqa: BLE001
            return f"ERROR: {type(e).__name__}: {clean_text(e, 300)}"

    def tool_read(self, root, log, path):
        rel, err = check_path(".", path, READABLE | ({log} if log else set()))
        if not err and rel in EDITABLE:
            _, err = check_path(root, rel, EDITABLE)
        if err:
            return f"ERROR: {err}"
        full = os.path.join(root, rel) if rel in EDITABLE else rel
        if not os.path.exists(full):
            return f"ERROR: {rel} does not exist yet"
        text = read_text(full)
        if rel == PROGRAM:   # as in the system prompt
            text = fill_metric(text, self.metric)
        if rel.startswith("logs/"):
            text = "\n".join(text.split("\n")[-150:])
        return text[-READ_MAX_CHARS:]

    def tool_edit(self, root, path, old, new):
        rel, err = check_path(root, path, EDITABLE)
        if err:
            return f"ERROR: {err}"
        text, err = apply_edit(read_text(os.path.join(root, rel)), old, new)
        if err:
            return f"ERROR: {err}"
        limit = SCRATCHPAD_MAX_CHARS if rel == SCRATCHPAD else self.train_limit
        if len(text) > limit:
            fix = ("condense older entries (replace them by a short summary) instead of adding" if rel == SCRATCHPAD
                   else "the whole file goes into every prompt beside program.md and the rules: make it shorter")
            return f"ERROR: {rel} would grow to {len(text)} characters, more than its limit of {limit}: {fix}"
        write_text(os.path.join(root, rel), text)
        why = parse_error(text) if rel == TRAIN else None
        note = f" WARNING: {why}; fix it before running." if why else ""
        return f"OK: edited {rel} ({len(text.splitlines())} lines).{note}"

    def prerun_check(self, root, base_src):
        src = read_text(os.path.join(root, TRAIN))
        why = parse_error(src)
        if why:
            return f"{why}; fix it with edit_file"
        if src == base_src:
            return "train.py is identical to the version already run; change it with edit_file first"
        other = [f for f in dirty_files(root) if f not in EDITABLE]
        if other:
            return f"only train.py and scratchpad.md may change, but also changed: {', '.join(other)}"
        return None

