"""How an experiment ends: its Outcome, its row in results.tsv (read back exactly on --resume), its commit."""
import datetime
import os
import re
from dataclasses import dataclass, field

from engine.judge import pooled_sigma
from engine.project import INT_COLUMNS, TEXT_COLUMNS, project_metric
from engine.util import HarnessError, RESULTS, clean_text, fmt, num, read_text, write_text


STATUSES = ("baseline", "keep", "discard", "crash", "timeout", "invalid", "interrupted")


def parse_trailers(message):
    """`Key: value` lines of a structured commit message."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^([A-Z][A-Za-z-]*): (.*)$", message, re.M)}


def commit_message(exp, description, phase_line, status, metric, value=None, delta=None, extra=None):
    lines = [f"exp {exp}: {clean_text(description, 72)}", "", f"Hypothesis: {clean_text(description, 1000)}",
             f"Experiment: {exp}", f"Phase: {phase_line}", f"Status: {status}"]
    if value is not None:
        lines.append(f"Metric: {metric.column} {cell(value)}")
    if delta is not None:
        lines.append(f"Delta: {cell(delta)}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines) + "\n"


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


def append_row(row, metric, path=RESULTS):
    """Add one row under the file's header (the file rewritten whole, write_text); a new file starts with the
    project's header."""
    old = read_text(path) if os.path.exists(path) else ""
    old = old or "\t".join(metric.columns) + "\n"
    write_text(path, old + format_row(row, old.split("\n", 1)[0].split("\t")))


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
