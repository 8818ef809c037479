"""Verdicts: the trusted block of a run, its status, the time budget, and the rule that keeps or discards."""
import math
import re
import statistics

from engine.project import project_metric
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
