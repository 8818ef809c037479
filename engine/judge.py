"""Verdicts: the trusted block of a run, its status, the time budget, and the rule that keeps or discards."""
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from engine.util import fmt
from engine.verdicts import VERDICTS, Exit, Status


# The time budget is the harness's: run.sh times the training container itself (train_wall_seconds), from its go to
# its exit. A candidate may run past the budget by a fixed allowance for start-up, data loading and export:
# ALLOWANCE_SHARE of the budget, at least ALLOWANCE_MIN seconds. Nothing measured widens it (a baseline slowed by a busy
# machine once bought candidates several times the budget); beyond it a run is invalid, and GRACE_MARGIN seconds later
# run.sh kills it (AUTORESEARCH_GRACE, unless the user set it). The baseline is the user's own train.py: it gets
# run.sh's generous default grace, and a warning where its own overhead would not fit the allowance.
ALLOWANCE_SHARE = 0.10


ALLOWANCE_MIN = 30.0


GRACE_MARGIN = 10


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


def budget_allowance(budget, asked=None):
    """Pure. Seconds a candidate's training container may run past the budget: the user's (--allowance), else
    max(ALLOWANCE_SHARE x budget, ALLOWANCE_MIN)."""
    return float(asked) if asked else max(ALLOWANCE_SHARE * budget, ALLOWANCE_MIN)


def classify_run(returncode, output, metrics, metric, budget=None, allowance=None):
    """Pure. The verdict of a run, (status, reason): the status from run.sh's exit code alone (verdicts.VERDICTS),
    never from its text (the candidate writes part of it); the reason from run.sh's last own message (a set-up error
    spans lines). A complete run is a crash without val_<METRIC>, and invalid when given an allowance it overran."""
    lines = [line for line in output.split("\n") if line.strip()]
    start = max((i for i, line in enumerate(lines) if line.startswith("run.sh: ")), default=len(lines) - 1)
    said = " ".join(line.strip() for line in lines[start:])
    status, meaning = VERDICTS.get(returncode, (Status.CRASH, f"run.sh exit {returncode}"))
    if returncode == Exit.OK:
        wall = metrics.get("train_wall_seconds")
        if metric.column not in metrics:
            return Status.CRASH, "no trusted metric"
        if allowance is not None and (wall is None or wall > budget + allowance):
            took = "has no trusted train_wall_seconds" if wall is None else f"took {wall:.0f}s"
            return Status.INVALID, (f"over the time budget: training {took}, more than the {budget}s budget + "
                                    f"{allowance:.0f}s allowed for start-up and export (max({ALLOWANCE_SHARE:.0%} of "
                                    f"the budget, {ALLOWANCE_MIN:g}s)); TIME_BUDGET is fixed by the harness")
        return Status.OK, ""
    if returncode == Exit.OOM:
        return status, meaning
    if status == Status.CRASH:
        return status, f"run.sh exit {returncode}" + (f": {said[:200]}" if said else "")
    return status, said[:500 if status == Status.SETUP else 200] or meaning


# ----------------------------------------------------------------------------------------------
# The keep rule: the one place where it lives, pure functions that both the loop (engine/loop.py) and the Monte Carlo
# of tests/bench_research.py drive. Noise is relative: s is a run-to-run SD as a fraction of the metric. The loop:
#
#   inc = the baseline's K >= 2 runs; groups = [inc]       # groups: lists of runs of one commit, for pooled_cv
#   for each candidate:
#       runs, remeasured = [], 0
#       while (step := next_step(RULES[name], metric, inc, runs, pooled_cv(groups), remeasured)).action in (
#               "candidate", "incumbent"):
#           if step.action == "candidate": runs.append(<the candidate's value on a fresh seed>)
#           else: inc.append(<the incumbent's value on a fresh seed>); remeasured += 1
#       if step.action == "keep":
#           inc = incumbent_after_keep(runs, <the candidate's value on one more fresh seed>); groups.append(inc[1:]...)
#       elif len(runs) >= 2: groups.append(runs[1:])
#
# A candidate's first run stays out of s (the screen picked it for being good: s comes out ~10% too high with it),
# so the kept commit's group is inc less that run, and grows with its re-measures (a view, or rebuilt each time).
# s is re-estimated at every step: the re-measures add to it (fewer false keeps while the baseline is all there is).
# A run that fails is not appended (ask again, or discard). Workers (--workers N): every candidate of a round goes
# through that while loop against the round's inc, with ONE remeasured count for the round (the incumbent's
# re-measures are shared); round_winner(metric, {key: runs of each candidate kept}) is the one kept, any other one
# kept is discarded as beaten. No Sidak: the error rate that matters is per candidate, and next_step holds it. The
# recorded best of a keep is mean(runs) (step.stat its t); the runs made after it (the one more run, the
# re-measures) are the honest estimate of the kept code.

@dataclass(frozen=True)
class Rule:
    """A keep rule as a table of thresholds on t, one entry per candidate run: after n runs the candidate is
    discarded if t <= low[n-1], kept if t > high[n-1], else run again; the last entry decides (low == high). The
    incumbent is run once more after each of the candidate's first `remeasure` runs (per round with workers) that
    do not end it, while it has fewer than max_incumbent runs."""
    name: str
    low: tuple
    high: tuple
    max_incumbent: int
    remeasure: int = 1
    summary: str = ""   # for the model's prompt

    def bound(self, n, keep):
        """The t that n runs were held to: high[n-1] for a keep, low[n-1] for a discard (the last entry: both)."""
        return (self.high if keep else self.low)[min(n, len(self.low)) - 1]


T_SCREEN, T_KEEP = 1.1, 1.85    # the default rule's two thresholds, tuned by tests/bench_research.py --mc-searches
RULES = {
    # screen, then confirm: ~1.4 runs per candidate; at equal compute the best final gain of the rules measured
    "screen": Rule("screen", low=(T_SCREEN, -math.inf, T_KEEP), high=(math.inf, math.inf, T_KEEP), max_incumbent=5,
                   summary=f"one run screens it (it goes on if t > {T_SCREEN}), two more confirm it (kept if "
                           f"t > {T_KEEP} over its three runs)"),
    # strict, a truncated SPRT: Wald's boundaries B/th + th/2 and A/th + th/2 (B = -2, A = 4.4, then raised by 0.2)
    # for a 10% gain at 7.5% noise, th = 1.33 / sqrt(1/n + 1/12); at 10 runs keep iff t > 2.2. ~5 runs per candidate
    "sequential": Rule("sequential", low=(-0.9, -0.3, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.8, 2.2),
                       high=(math.inf, 3.6, 3.4, 3.3, 3.2, 3.2, 3.2, 3.2, 3.2, 2.2), max_incumbent=32, remeasure=6,
                       summary="it runs again until a sequential test decides, up to 10 runs"),
}
OUTLIER_T = 5.0     # a run this many SDs from its group's other runs is an outlier (pooled_cv, incumbent_mean)


class Step(NamedTuple):
    action: str     # "candidate" (run it once more) | "incumbent" (run the incumbent once more) | keep | discard
    stat: float     # t, the decision's statistic (None before the candidate's first run)
    reason: str


def _ss(g):
    """Sum of squared deviations of a group of runs from its mean, relative to that mean (0 under 2 runs)."""
    if len(g) < 2:
        return 0.0
    m = sum(g) / len(g)
    return sum((x - m) ** 2 for x in g) / m ** 2


def _farthest(groups):
    """{group: (e, run)}: in each group of >= 2 runs, the run farthest from the mean of the group's other runs, e its
    relative deviation from that mean scaled to one run's SD: |x / mean(others) - 1| / sqrt(1 + 1/(n-1))."""
    out = {}
    for i, g in enumerate(groups):
        n, total = len(g), sum(g)
        if n >= 2:
            e, j = max((abs(x * (n - 1) / (total - x) - 1) if total != x else math.inf, j) for j, x in enumerate(g))
            out[i] = (e / math.sqrt(n / (n - 1)), j)
    return out


def pooled_cv(groups, cut=None):
    """Pure. The run-to-run SD relative to the metric (as a fraction of each group's mean), pooled over groups of
    repeated runs of one commit (different seeds); groups of < 2 runs (or of mean 0) count for nothing; None if none.
    Robust to outliers (runs on a busy machine), one per group: of the runs farthest from their group's other runs,
    the k most extreme (k = 1, 2, 3: an outlier must not hide another by inflating the SD it is judged by) are left
    out if each is more than `cut` (OUTLIER_T) times the pooled SD of every run but those k away from its group's
    other runs; repeated until none is. A Gaussian run passes 5 SDs about once in 2 million, but a baseline of
    K = 5 runs judged alone has 3 degrees of freedom to judge by: about 1 clean one in 13 loses a run."""
    groups, cut, done = [list(g) for g in groups if len(g) >= 2 and sum(g)], OUTLIER_T if cut is None else cut, set()
    while True:
        ss = [_ss(g) for g in groups]
        total, dof = sum(ss), sum(len(g) - 1 for g in groups)
        top = sorted(((e, i, j) for i, (e, j) in _farthest(groups).items() if i not in done), reverse=True)[:3]
        for k in range(1, len(top) + 1):
            rest = total - sum(ss[i] - _ss(groups[i][:j] + groups[i][j + 1:]) for _, i, j in top[:k])
            ref = math.sqrt(max(rest, 0.0) / (dof - k)) if dof > k else None
            if ref is not None and all(e > cut * ref for e, _, _ in top[:k]):
                for _, i, j in top[:k]:
                    del groups[i][j]
                    done.add(i)
                break
        else:
            return math.sqrt(total / dof) if dof else None


def incumbent_mean(runs, s, cut=None):
    """Pure. (mean, n) of the incumbent's runs less the one (at most; of 3 or more) farthest from the others' mean if
    that is more than `cut` (OUTLIER_T) times s away: one slow run of the incumbent would make every candidate look
    better. A candidate's runs are never trimmed (a bad run counts against it)."""
    e, j = _farthest([list(runs)]).get(0, (0.0, None)) if len(runs) >= 3 else (0.0, None)
    kept = [x for k, x in enumerate(runs) if not (k == j and e > (OUTLIER_T if cut is None else cut) * s)]
    return sum(kept) / len(kept), len(kept)


def next_step(rule, metric, incumbent, candidate, s, remeasured):
    """THE KEEP RULE. Pure: the next run to make, or the verdict, for a candidate (its values so far) against the
    incumbent (the kept commit's values), in the metric's direction; s is the relative run-to-run noise (pooled_cv),
    remeasured the number of incumbent runs made so far for this candidate (for this round, with workers).

        I, m = the mean and the number of the incumbent's runs (an outlier run left out: incumbent_mean)
        t = metric.gain(mean of the candidate's n runs, I) / (s * |I| * sqrt(1/n + 1/m))
        after n runs: keep if t > rule.high[n-1]; discard if t <= rule.low[n-1] or n is the table's last;
        else run the incumbent once more if remeasured < min(rule.remeasure, n) and m < rule.max_incumbent,
        else run the candidate once more.

    RULES["screen"], the default (screen, then confirm): one run of the candidate, discarded if t <= 1.1 (most
    candidates with no real gain end there, after one run); else one more run of the incumbent while it has fewer
    than 5 runs, two more of the candidate, and keep iff t > 1.85 on its three runs. RULES["sequential"] (strict): a
    truncated sequential test of up to 10 runs, the incumbent re-measured alongside up to 32 runs. After a keep, one
    more run of the candidate: incumbent_after_keep. s = 0 (training that repeats itself exactly): any gain is real,
    after the same runs. ValueError if s is unknown (the baseline needs >= 2 runs) or the incumbent has no run."""
    if s is None or not 0 <= s < math.inf:
        raise ValueError(f"the keep rule needs the run-to-run noise, s = {s}: the baseline needs >= 2 runs "
                         "(--noise-runs >= 2)")
    if not incumbent:
        raise ValueError("the keep rule needs at least one run of the incumbent")
    if not candidate:
        return Step("candidate", None, "first run")
    best, m = incumbent_mean(incumbent, s)
    if not best:
        raise ValueError("the keep rule's noise is relative: it needs a metric whose values are not 0")
    n = len(candidate)
    gain, se = metric.gain(sum(candidate) / n, best), s * abs(best) * math.sqrt(1 / n + 1 / m)
    t = gain / se if se else math.copysign(math.inf, gain) if gain else 0.0   # no noise: any gain is real
    why = f"t {t:.3g} after {n} run(s) against {fmt(best)} ({m} run(s)), s {s:.3g}"
    low, high = rule.low[min(n, len(rule.low)) - 1], rule.high[min(n, len(rule.high)) - 1]
    if t > high:
        return Step(Status.KEEP, t, f"{why}: > {high:g}")
    if t <= low or n >= len(rule.low):
        return Step(Status.DISCARD, t, f"{why}: not > {high if n >= len(rule.low) else low:g}")
    if int(remeasured) < min(rule.remeasure, n) and len(incumbent) < rule.max_incumbent:
        return Step("incumbent", t, f"{why}: > {low:g}, the incumbent once more first")
    return Step("candidate", t, f"{why}: > {low:g}, once more" if low > -math.inf else f"{why}: once more")


def incumbent_after_keep(candidate_runs, fresh_run):
    """Pure. The new incumbent's runs after a keep: the candidate's runs and the one run made after its keep (None if
    that run failed)."""
    return [*candidate_runs, *([] if fresh_run is None else [fresh_run])]


def round_winner(metric, kept):
    """Pure. Workers: of the candidates that next_step kept in one round ({key: their runs}), the key of the one to
    keep: the best mean in the metric's direction (ties: the first). None if none. The others are beaten: discarded."""
    return max(kept, key=lambda k: metric.gain(sum(kept[k]) / len(kept[k]), 0.0), default=None)


def baseline_failure(run, seed, values, wall, budget, grace):
    """Pure. Why baseline seed `seed` failed, in words a user can act on. A timeout after seeds that finished well
    within the limit is the machine's (busy), not train.py's."""
    limit = f"its limit of budget {budget}s + grace {grace}s (AUTORESEARCH_GRACE)"
    if run.status == Status.TIMEOUT and values:
        return (f"baseline seed {seed} ran out of time ({limit}), where seeds 1-{seed - 1} finished (the slowest "
                f"training container took {wall:.0f}s): the machine was slower this time (busy?), not train.py over "
                f"its budget. The {len(values)} finished seeds are recorded. Free the machine, or export "
                f"AUTORESEARCH_GRACE={2 * grace} for more time.")
    if run.status == Status.TIMEOUT:
        return (f"baseline seed 1 ran out of time ({limit}): does train.py stop at TIME_BUDGET? If its start-up and "
                f"export take that long, export AUTORESEARCH_GRACE={2 * grace}; on a busy machine, free it first.")
    return (f"baseline seed {seed} failed ({run.status}: {run.reason}); see {run.log}"
            + (f" (the {len(values)} finished seeds are recorded)" if values else "") +
            ". Fix train.py or the sandbox, and commit the fix on this branch (a new commit runs every seed again).")


def allowance_warning(over, allowance, budget):
    """Pure. When the baseline's training container ran `over` seconds past the budget, more than a candidate may:
    the warning that says what will happen and what to do; else None."""
    if over <= allowance:
        return None
    return (f"WARNING: the baseline's training container ran {over:.0f}s past the {budget}s budget (start-up, data "
            f"loading, export), more than the {allowance:.0f}s a candidate may (max({ALLOWANCE_SHARE:.0%} of the "
            f"budget, {ALLOWANCE_MIN:g}s)): candidates like it will be recorded invalid: a busy machine, or a start-up "
            f"to shorten; or allow more with --allowance {round(over * 1.5)}")


def decision(rule, step, values, inc, s):
    """Pure. The fields a decided experiment records: (delta, threshold), the threshold in the metric's units at
    the step's bound (the keep bound for a keep, the one it fell short of for a discard)."""
    best, m = incumbent_mean(inc, s)
    n = len(values)
    return sum(values) / n - best, rule.bound(n, step.action == Status.KEEP) * s * abs(best) * (1 / n + 1 / m) ** 0.5


def best_line(metric, rule, inc, s):
    """Pure. What the model is told of the best and of the keep rule."""
    best, m = incumbent_mean(inc, s)
    return (f"{metric.column} {fmt(best)}, the mean of {m} runs (run-to-run noise {s:.1%} of it). A change is kept "
            f"only if it beats this by more than the noise: {rule.summary}")
