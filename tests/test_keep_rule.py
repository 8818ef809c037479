"""The keep rule (engine/judge.py): next_step and its pure helpers, and a small Monte Carlo of whole searches driven by the
real next_step (tests/bench_research.py) against the old one-run rule."""
import math
import os
import random
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from conftest import git, scripted_loop  # noqa: E402
from engine.judge import (RULES, T_KEEP, T_SCREEN, incumbent_after_keep, incumbent_mean, next_step,  # noqa: E402
                          pooled_cv, round_winner)
from engine.project import Metric  # noqa: E402
from engine.results import load_results  # noqa: E402
from engine.tuners import Tuner  # noqa: E402
from engine.util import read_text  # noqa: E402

MIN, MAX = Metric("loss", "minimize"), Metric("acc", "maximize")
SCREEN, SEQ = RULES["screen"], RULES["sequential"]
S = 0.05                                  # relative run-to-run SD
BASE = [98.0, 102.0, 100.0, 99.0, 101.0]  # the baseline's K = 5 runs: mean 100
KEPT = [98.0, 102.0, 100.0, 100.0]        # an incumbent after a keep: 3 runs and one more, mean 100


def drive(rule, metric, inc, values, s=S, inc_values=(100.0,)):
    """Runs next_step's while loop as the loop does: the candidate's values in order, the incumbent's re-measures
    from inc_values. Returns (the actions asked for, the final step, the incumbent's runs)."""
    inc, runs, remeasured, asked = list(inc), [], 0, []
    values, inc_values = iter(values), iter(inc_values)
    while (step := next_step(rule, metric, inc, runs, s, remeasured)).action in ("candidate", "incumbent"):
        asked.append(step.action)
        if step.action == "candidate":
            runs.append(next(values))
        else:
            inc.append(next(inc_values))
            remeasured += 1
    return asked, step, inc


def test_screen_lucky_first_run_then_discarded():
    # 90 is a gain of 10 (t1 = 10 / (5 * sqrt(1 + 1/4)) = 1.79 > T_SCREEN): the incumbent (4 runs, as after a keep)
    # is re-measured, the candidate runs twice more; 101 and 99 bring its mean to 96.7:
    # t3 = 3.3 / (5 * sqrt(1/3 + 1/5)) = 0.91 <= T_KEEP
    asked, step, inc = drive(SCREEN, MIN, KEPT, [90.0, 101.0, 99.0])
    assert asked == ["candidate", "incumbent", "candidate", "candidate"]
    assert step.action == "discard" and step.stat == pytest.approx(10 / 3 / (5 * math.sqrt(1 / 3 + 1 / 5)))
    assert len(inc) == 5


def test_screen_real_gain_kept_after_exactly_three_runs():
    asked, step, _ = drive(SCREEN, MIN, BASE, [80.0, 82.0, 79.0, 1e9])   # the 4th value is never asked for
    assert asked == ["candidate"] * 3 and step.action == "keep" and step.stat > T_KEEP
    # even a huge gain is not kept on one or two runs
    assert next_step(SCREEN, MIN, BASE, [50.0], S, 1).action == "candidate"
    assert next_step(SCREEN, MIN, BASE, [50.0, 50.0], S, 1).action == "candidate"


def test_screen_discards_after_one_run():
    for v in (100.0, 95.0, 130.0):   # t1 = 0, 0.91, negative: not > T_SCREEN
        asked, step, inc = drive(SCREEN, MIN, BASE, [v])
        assert asked == ["candidate"] and step.action == "discard" and inc == BASE
    assert next_step(SCREEN, MIN, BASE, [], S, 0) == ("candidate", None, "first run")


def test_incumbent_remeasured_only_while_fewer_than_max_runs_and_once():
    k = SCREEN.max_incumbent
    fewer, enough = [100.0] * (k - 2) + [99.0], [100.0] * (k - 1) + [99.0]
    assert next_step(SCREEN, MIN, fewer, [85.0], S, 0).action == "incumbent"
    assert next_step(SCREEN, MIN, fewer, [85.0], S, False).action == "incumbent"     # a bool will do
    assert next_step(SCREEN, MIN, enough, [85.0], S, 0).action == "candidate"
    assert next_step(SCREEN, MIN, fewer, [85.0], S, 1).action == "candidate"       # once per candidate
    assert next_step(SCREEN, MIN, fewer, [85.0, 86.0], S, 0).action == "incumbent"  # (if it was not yet)
    assert drive(SCREEN, MIN, enough, [85.0, 84.0, 86.0])[0] == ["candidate"] * 3
    assert drive(SCREEN, MIN, [100.0, 101.0], [85.0, 84.0, 86.0], inc_values=[99.0] * 5)[0] == \
        ["candidate", "incumbent", "candidate", "candidate"]                           # one per candidate, not more


def test_screen_rescreens_against_the_remeasured_incumbent():
    # t1 = 7 / (5 * sqrt(1.25)) = 1.25 passes; the incumbent's re-measure (85) moves I to 97: t1 = 0.73: discarded
    asked, step, _ = drive(SCREEN, MIN, KEPT, [93.0], inc_values=[85.0])
    assert asked == ["candidate", "incumbent"] and step.action == "discard"


def test_directions_mirror():
    up = [2 * 100.0 - v for v in BASE]             # the same runs mirrored around 100, to maximize
    assert drive(SCREEN, MAX, up, [120.0, 118.0, 121.0])[1].action == "keep"
    assert drive(SCREEN, MIN, BASE, [120.0])[1].action == "discard"   # worse when minimizing
    assert drive(SCREEN, MAX, up, [80.0])[1].action == "discard"
    lo = drive(SCREEN, MIN, BASE, [90.0, 101.0, 99.0])[1]
    hi = drive(SCREEN, MAX, up, [110.0, 99.0, 101.0], inc_values=[100.0])[1]
    assert (lo.action, lo.stat) == (hi.action, pytest.approx(hi.stat))


def test_unknown_noise_refused_and_no_noise_any_gain_is_real():
    assert pooled_cv([[100.0]]) is None and pooled_cv([]) is None     # --noise-runs 1: no s
    for s in (None, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="noise"):
            next_step(SCREEN, MIN, [100.0], [90.0], s, 0)
    with pytest.raises(ValueError):
        next_step(SCREEN, MIN, [], [90.0], S, 0)
    # training that repeats itself exactly (s = 0): a gain, however small, is kept after the rule's runs; no gain, not
    assert pooled_cv([[48.0, 48.0]]) == 0.0
    asked, step, _ = drive(SCREEN, MIN, [48.0, 48.0], [47.9] * 3, s=0.0, inc_values=[48.0])
    assert asked == ["candidate", "incumbent", "candidate", "candidate"] and step.action == "keep"
    assert drive(SCREEN, MIN, [48.0, 48.0], [48.0], s=0.0)[1].action == "discard"
    assert drive(SCREEN, MIN, [48.0, 48.0], [48.1], s=0.0)[1].action == "discard"


def test_pooled_cv_relative_and_robust_to_an_outlier():
    rng = random.Random(1)
    truth = 0.075
    groups = [[scale * (1 + truth * rng.gauss(0, 1)) for _ in range(n)]
              for scale, n in [(100.0, 5), (80.0, 4), (60.0, 2), (60.0, 3), (50.0, 6), (45.0, 2), (40.0, 3)]]
    clean = pooled_cv(groups)
    assert clean == pytest.approx(pooled_cv(groups, cut=math.inf))           # nothing trimmed on clean runs
    assert clean == pytest.approx(truth, rel=0.3)
    slow = [list(g) for g in groups]
    slow[1][2] *= 2.0                                                             # one run on a busy machine
    plain = pooled_cv(slow, cut=math.inf)
    assert plain > 2 * truth                                                      # the plain pooled SD blows up
    assert pooled_cv(slow) == pytest.approx(clean, rel=0.1)
    slow[4][0] *= 1.8                                                             # a second one, in another group,
    assert pooled_cv(slow) == pytest.approx(clean, rel=0.15)                   # does not hide the first
    # relative: the same noise at another scale gives the same s
    assert pooled_cv([[10 * x for x in g] for g in groups]) == pytest.approx(clean)


def test_pooled_cv_baseline_alone_with_a_slow_run():
    base = [26.7, 25.5, 28.1, 27.2, 55.0]    # K = 5, the last one slow
    assert pooled_cv([base]) == pytest.approx(pooled_cv([base[:4]]))
    assert pooled_cv([base[:4]]) < 0.05 < pooled_cv([base], cut=math.inf)


def test_incumbent_mean_drops_a_slow_incumbent_run_only():
    inc = [100.0, 101.0, 99.0, 100.0, 200.0]
    assert incumbent_mean(inc, S) == (100.0, 4)
    assert incumbent_mean(inc[:4], S) == (100.0, 4)
    assert incumbent_mean([100.0, 200.0], S) == (150.0, 2)       # two runs: no way to tell which
    # the slow incumbent run would make a null candidate look like a 17% gain; trimmed, it is discarded
    assert next_step(SCREEN, MIN, inc, [100.0], S, 0).action == "discard"
    # a candidate's own slow run is never trimmed: it counts against it
    assert drive(SCREEN, MIN, BASE, [85.0, 170.0, 84.0])[1].action == "discard"


def test_incumbent_after_keep():
    assert incumbent_after_keep([90.0, 91.0, 89.0], 92.0) == [90.0, 91.0, 89.0, 92.0]
    assert incumbent_after_keep([90.0, 91.0, 89.0], None) == [90.0, 91.0, 89.0]


def test_sequential_truncated():
    low, high, last = SEQ.low, SEQ.high, len(SEQ.low)
    assert len(high) == last and low[-1] == high[-1] and all(a <= b for a, b in zip(low, high))
    assert high[0] == math.inf                                         # never kept on one run
    inc = [100.0] * 15 + [101.0]
    best, m = sum(inc) / len(inc), len(inc)

    def mean_for(t, n):   # the candidate mean whose t after n runs is t
        return best - t * S * best * math.sqrt(1 / n + 1 / m)
    # hovering between the boundaries: a verdict only at the table's last entry, kept iff t > its threshold there
    for final, verdict in ((low[-1] + 0.3, "keep"), (low[-1] - 0.3, "discard")):
        runs = []
        for n in range(1, last + 1):
            t = final if n == last else (max(low[n - 1], 0.0) + min(high[n - 1], 4.0)) / 2
            runs.append(mean_for(t, n) * n - sum(runs))
            step = next_step(SEQ, MIN, inc, runs, S, SEQ.remeasure)
            assert step.stat == pytest.approx(t)
            assert step.action == (verdict if n == last else "candidate"), (n, step)
    # the incumbent is re-measured alongside: once after each of the candidate's first runs, up to rule.remeasure
    asked = drive(SEQ, MIN, inc, [mean_for(1.5, 1)] + [best] * (last - 1), inc_values=[best] * 99)[0]
    assert 1 < asked.count("incumbent") <= SEQ.remeasure
    # a clear gain is kept long before the truncation, a clear loss discarded after one run
    asked, step, _ = drive(SEQ, MIN, inc, [80.0] * last, inc_values=[100.0] * 99)
    assert step.action == "keep" and asked.count("candidate") == 2
    assert drive(SEQ, MIN, inc, [110.0])[1].action == "discard"


def test_round_winner():
    kept = {7: [90.0, 91.0, 92.0], 8: [89.0, 90.0, 91.0], 9: [95.0, 85.0, 90.0]}
    assert round_winner(MIN, kept) == 8 and round_winner(MAX, kept) == 7
    assert round_winner(MIN, {}) is None
    assert round_winner(MIN, {3: [90.0], 1: [90.0]}) == 3                  # ties: the first


def test_monte_carlo_new_rule_beats_old():
    """A real, falsifiable check on the whole search, deterministic by seed: with the engine's own next_step, the
    default rule keeps fewer seed-only nulls than the old one-run rule and finds +20% gains more often."""
    import bench_research as b
    o = dict(seed=0, searches=1000, n_world=40, n_cand=40, budget=math.inf, k=5, cv=0.075, outlier_rate=0.0,
             outlier_factor=2.0, workers=4)
    old, new = "OLD: one run, z 2 (today)", "screen, then confirm"
    r = b.monte_carlo(o, [old, new], procs=1)
    assert r[new]["null"] < r[old]["null"]
    assert r[new]["+20%"] > r[old]["+20%"] + 0.2
    assert r[new]["gain"] > r[old]["gain"]


def test_docstring_states_the_rules_numbers():
    """next_step's docstring is THE statement of the rule (the README quotes it): its numbers are RULES'."""
    doc = " ".join(next_step.__doc__.split())
    assert SCREEN.low == (T_SCREEN, -math.inf, T_KEEP) and SCREEN.high[-1] == T_KEEP
    for phrase in (f"discarded if t <= {T_SCREEN:g}", f"fewer than {SCREEN.max_incumbent} runs",
                   f"keep iff t > {T_KEEP:g} on its three runs", f"up to {len(SEQ.low)} runs",
                   f"up to {SEQ.max_incumbent} runs"):
        assert phrase in doc, phrase


# ---------------------------------------------------------------- the lifecycle that drives it (engine/loop.py)
# The loop with its runs scripted (no sandbox: each label's value is given), on a real git repository, with the random
# tuner as the agent: which runs the rule asks for, in which checkout, what results.tsv and the branch hold after.



@pytest.fixture
def repo(scripted_project):
    return scripted_project


def scripted(values, **args):
    a = types.SimpleNamespace(tag="t", resume=False, rule="screen", noise_runs=4, time_budget=60, allowance=None,
                              max_experiments=1, workers=1, fix_attempts=0, phase_every=10, phase_plateau=5, **args)
    return scripted_loop(a, Tuner("random", "LR = 1.0\n", read_text("program.md"), False, 0, MIN),
                         lambda label, seed, train: values[label])


BASELINE = {"0": 100.0, "0-s2": 106.0, "0-s3": 94.0, "0-s4": 100.0}   # s about 5%, 4 runs: one re-measure


def test_a_lucky_first_run_is_screened_in_then_discarded_on_confirmation(repo):
    loop = scripted({**BASELINE, "1": 90.0, "1-i5": 100.0, "1-s2": 102.0, "1-s3": 100.0})
    loop.main()
    assert [a for a in loop.asked if not a[0].startswith("0")] == [
        ("1", 1, "w0"), ("1-i5", 5, "main"), ("1-s2", 2, "w0"), ("1-s3", 3, "w0")]   # screen, re-measure, confirm
    (_, row), = [(i, r) for i, r in enumerate(load_results(metric=MIN)) if r["experiment"] == "1"]
    assert (row["status"], row["runs"], row["incumbent_runs"], row["after_runs"]) == ("discard", "90,102,100", "100", "")
    assert row["best"] == "100" and "after 3 run(s)" in row["reason"] and float(row["t"]) <= T_KEEP
    assert open("train.py").read() == "LR = 1.0\n" and git(repo, "status", "--porcelain") == ""


def test_a_real_gain_is_kept_after_three_runs_then_run_once_more(repo):
    loop = scripted({**BASELINE, "1": 80.0, "1-i5": 100.0, "1-s2": 82.0, "1-s3": 81.0, "1-s4": 83.0})
    loop.main()
    assert [a for a in loop.asked if not a[0].startswith("0")] == [
        ("1", 1, "w0"), ("1-i5", 5, "main"), ("1-s2", 2, "w0"), ("1-s3", 3, "w0"), ("1-s4", 4, "main")]
    row = load_results(metric=MIN)[-1]
    assert (row["status"], row["runs"], row["incumbent_runs"], row["after_runs"]) == ("keep", "80,82,81", "100", "83")
    assert float(row["best"]) == 81.5 and row["honest"] == "83" and float(row["t"]) > T_KEEP
    head = git(repo, "log", "-1", "--format=%B")
    assert "Status: keep" in head and "Runs: 80,82,81" in head and open("train.py").read() != "LR = 1.0\n"
    assert git(repo, "status", "--porcelain") == "" and not os.path.exists(".worktrees")


def test_a_deterministic_project_keeps_any_gain_and_resumes(repo):
    """Identical runs (a project with no noise): s is 0, t is infinite for any gain, and results.tsv, which records it,
    reads back on --resume."""
    values = {"0": 100.0, "0-s2": 100.0, "0-s3": 100.0, "0-s4": 100.0, "1": 99.0, "1-s2": 99.0, "1-s3": 99.0,
              "1-s4": 99.0, "1-i5": 100.0, "2": 99.5, "2-i6": 100.0}
    scripted(values).main()
    row = load_results(metric=MIN)[-1]
    assert (row["status"], row["t"], row["sigma"], row["runs"]) == ("keep", "inf", "0", "99,99,99")
    loop = scripted(values)
    loop.args.resume, loop.args.max_experiments = True, 2
    loop.main()
    assert [r["status"] for r in load_results(metric=MIN)] == ["baseline", "keep", "discard"]
