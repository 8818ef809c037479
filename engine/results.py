"""How an experiment ends: its Outcome, its row in results.tsv (read back exactly on --resume), its commit."""
import datetime
import os
import re
from dataclasses import dataclass, field

from engine.judge import incumbent_mean, pooled_cv
from engine.project import INT_COLUMNS, LIST_COLUMNS, TEXT_COLUMNS
from engine.util import HarnessError, RESULTS, clean_text, fmt, num, read_text, write_text
from engine.verdicts import STATUSES, Status




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
    status: str = Status.INTERRUPTED   # until decided: baseline keep discard crash timeout invalid interrupted
    description: str = ""
    reason: str = ""
    phase: str = ""
    commit: str = ""              # its candidate commit (the keep commit once kept); "" before it made one
    base: str = ""                # the commit it started from, where it goes back to unless kept ("" for the baseline)
    values: list = field(default_factory=list)   # val_<METRIC> of each of its seeded runs, as the rule decided on them
    inc_runs: list = field(default_factory=list)  # the incumbent's re-measures made for it (judge.next_step)
    after: list = field(default_factory=list)    # a keep's run made after the decision: the honest estimate
    delta: float = None           # mean(values) - the best it was compared with
    t: float = None               # the rule's statistic at the decision
    threshold: float = None       # the gain the decision asked for, in the metric's units
    train_wall_seconds: float = None
    model_seconds: float = 0.0
    run_seconds: float = 0.0
    prompt_tokens: int = 0
    started: float = None         # time.time() at its start: wall_seconds
    agent: str = "llm"
    proposer: str = ""            # who proposed it: the agent, or with --agent hybrid its side (llm, optuna)
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
        after = f"; the run after the keep gave {fmt(row['honest'])}" if row.get("honest") is not None else ""
        return head + f"KEPT, {col} {mean} over {len(runs)} runs: {row['reason']}. The new best is {best}{after}"
    what = f"{row['status']}, {col} {mean}" + (f" over {len(runs)} runs" if len(runs) > 1 else "") if runs else \
        row["status"]
    return head + f"{what}: {row['reason']}. The best stays {best}"


def make_row(o, rows, metric, now):
    """Pure. The one row builder: an Outcome as a typed results row, after `rows`. best is the incumbent's mean after
    it, as the rule compares with it (incumbent_mean), honest the mean of the incumbent's runs made after its keep
    decision (all of the baseline's), sigma the noise in the metric's units (pooled_cv x |best|)."""
    row = {"experiment": o.experiment, "commit": o.commit, metric.column: o.values[0] if o.values else None,
           "delta": o.delta, "status": o.status, "description": o.description, "runs": tuple(o.values),
           "threshold": o.threshold, "reason": o.reason, "phase": o.phase,
           "best_commit": o.commit if o.status in (Status.BASELINE, Status.KEEP) else o.base,
           "model_seconds": o.model_seconds, "run_seconds": o.run_seconds,
           "wall_seconds": now - o.started if o.started else None, "prompt_tokens": o.prompt_tokens,
           "finished": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"), "agent": o.agent,
           "train_wall_seconds": o.train_wall_seconds, "round": o.round, "worker": o.worker,
           "time_budget": o.time_budget, "t": o.t, "incumbent_runs": tuple(o.inc_runs), "after_runs": tuple(o.after),
           "proposer": o.proposer or o.agent}
    inc, honest = incumbent(rows + [row])
    s = pooled_cv(noise_groups(rows + [row]))
    best = (incumbent_mean(inc, s)[0] if s else sum(inc) / len(inc)) if inc else None
    return dict(row, best=best, sigma=s * abs(best) if s is not None and best is not None else None,
                honest=sum(honest) / len(honest) if honest else None)


def typed_row(cells, metric):
    """Pure. A results.tsv row (text by column name) as the loop keeps it: numbers as numbers, runs as a tuple.
    Rows of a harness before rounds and workers: every experiment was its own round (the baseline's 0), worker 0."""
    row = {}
    for c in metric.columns:
        v = cells.get(c, "")
        row[c] = v if c in TEXT_COLUMNS else tuple(runs_of(cells, c)) if c in LIST_COLUMNS else num(v)
        if c in INT_COLUMNS and row[c] is not None:
            row[c] = int(row[c])
    if row["round"] is None:
        row["round"] = 0 if row["status"] == Status.BASELINE else row["experiment"]
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
    if column in TEXT_COLUMNS or not v or (column == "t" and v in ("inf", "-inf")):   # t without noise: any gain
        return True
    return all(num(x) is not None for x in v.split(",")) if column in LIST_COLUMNS else num(v) is not None


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


def runs_of(row, column="runs"):
    """The values of a row's runs (or of another list column): a tuple in memory, comma-separated in a results file."""
    v = row.get(column) or ()
    return [x for x in map(num, v.split(",") if isinstance(v, str) else v) if x is not None]


def incumbent(rows):
    """Pure. (runs, honest runs) of the best commit: all its runs (the baseline's, or a keep's decided runs and the run
    made after it) with the re-measures made since; honest, those made after its decision (all of the baseline's)."""
    runs, honest = [], []
    for r in rows:
        again = runs_of(r, "incumbent_runs")   # made for this experiment, of the incumbent it started from
        runs, honest = runs + again, honest + again
        if r["status"] == "baseline":
            runs, honest = runs_of(r), runs_of(r)
        elif r["status"] == "keep":
            runs, honest = runs_of(r) + runs_of(r, "after_runs"), runs_of(r, "after_runs")
    return runs, honest


def noise_groups(rows, extra=()):
    """Pure. The groups of runs of one commit that the noise is pooled over (judge.pooled_cv): the baseline's runs and
    its re-measures; a kept commit's runs, the run after it and its re-measures; a discarded candidate's runs, each
    but the baseline less its first run (the screen picked that run for looking good: with it s comes out ~10% too
    high). `extra`: re-measures of the incumbent not recorded yet (the round in flight)."""
    groups, current = [], []
    for r in rows:
        current += runs_of(r, "incumbent_runs")   # the same list as the incumbent's group in groups
        if r["status"] in (Status.BASELINE, Status.KEEP):
            current = runs_of(r)[r["status"] == "keep":] + runs_of(r, "after_runs")
            groups.append(current)
        elif r["status"] == Status.DISCARD and len(runs_of(r)) >= 2:
            groups.append(runs_of(r)[1:])
    current += list(extra)
    return groups


def pending_baseline(rows):
    """Pure. The row of a baseline that stopped part-way (interrupted, round 0: its runs are the seeds that finished)
    while no baseline is recorded, else None."""
    if any(r["status"] == Status.BASELINE for r in rows):
        return None
    return next((r for r in reversed(rows) if r["status"] == Status.INTERRUPTED and r["round"] == 0), None)


def state_from_rows(rows):
    """Pure. (best value, best commit, best experiment, baseline experiment) from recorded rows: the best as the last
    row left it (the incumbent's mean, which re-measures move)."""
    best = best_commit = best_exp = base_exp = None
    for r in rows:
        if r["status"] in (Status.BASELINE, Status.KEEP):
            best_exp = r["experiment"]
            base_exp = r["experiment"] if r["status"] == Status.BASELINE else base_exp
        best = num(r.get("best")) if num(r.get("best")) is not None else best
        best_commit = r.get("best_commit") or best_commit
    return best, best_commit, best_exp, base_exp
