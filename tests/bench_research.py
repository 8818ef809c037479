"""Benchmark: how much can a keep be trusted?

    python tests/bench_research.py --calibration calib.json    # the full benchmark: default data and budget
    python tests/bench_research.py --calibration calib.json --rule sequential   # the loop again with another rule
    python tests/bench_research.py --budget 3 --n-train 300 --n-val 100 --n-test 100 --gains expert-off \\
        --nulls 1 --calib-seeds 3 --noise-runs 2     # a smoke run (minutes; its figures mean nothing)
    python tests/bench_research.py --mc-searches 4000   # only the Monte Carlo of whole searches (4., ~3 min)

1. Calibration. The unmodified train.py, each candidate gain and one seed-only null run with seeds 1..S through the
   real run.sh (AUTORESEARCH_IMAGE=host unless set). A candidate is a real gain iff its mean val_mean_rank beats
   the baseline's by more than 2 standard errors of the difference of the means.
2. The loop. A scripted competent agent (tests/fake_ollama.py, through the real ollama client) makes a fixed list
   of edits of known effect, one per experiment, each applied to the current best train.py, through the real
   autoresearch.py with the given keep-rule flags:
     nulls:  seed-only changes (SEED + 1000 k): every keep is a false keep;
     losses: LOGIT_SCALE_MAX = 2 (the original study's temperature cap) and half the training time (half the
             steps, same schedule shape): every keep is a false keep;
     gains:  the candidates of step 1.
3. Report: detection rate of the real gains, false-keep rates on nulls and losses, whether the final best beats
   the baseline on the test split; how far apart two runs of the same code on the same seed land (the calibration's
   baseline and the loop's).
4. The keep rules by Monte Carlo of whole searches (issue 20, --mc-searches): the engine's own next_step, pooled_cv,
   incumbent_after_keep and round_winner drive simulated searches (effects known, true values moving with each keep,
   noise and slow-machine outliers drawn, common random numbers across rules) against the old one-run rule,
   re-implemented here for comparison: false keeps, power, runs per candidate, the final true gain, how far the
   recorded best is from the truth, and the gain at equal compute.
"""
import argparse
import ast
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import engine.judge  # noqa: E402  (OUTLIER_T, set for the plain variant)
from conftest import copy_into  # noqa: E402
from engine.judge import RULES, incumbent_after_keep, incumbent_mean, next_step, parse_metrics, pooled_cv, round_winner  # noqa: E402
from engine.project import Metric, project_metric  # noqa: E402
from engine.report import load_test_scores  # noqa: E402
from engine.results import load_results, runs_of, state_from_rows  # noqa: E402
from engine.tuners import _number, apply_params, hyperparameters  # noqa: E402
from engine.util import TEST_SCORES  # noqa: E402
from fake_ollama import FakeOllama, tool_call  # noqa: E402

FILES = ["autoresearch.py", "engine", "train.py", "run.sh", "prepare_data.py", "program.md",
         "scratchpad.md", ".gitignore"]
SEED_EXPR = 'int(os.environ.get("AUTORESEARCH_SEED", 0))'
BUDGET_EXPR = 'float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300))'


def module_value(src, name, text):
    """train.py with the value of the module-level `NAME = ...` replaced by `text` (comments kept)."""
    node = [s for s in ast.parse(src).body if isinstance(s, ast.Assign) and getattr(s.targets[0], "id", "") == name][-1]
    line = src.split("\n")[node.lineno - 1]
    return src.replace(line, line.replace(ast.get_source_segment(src, node.value), text, 1), 1)


def constant(name, fn, cuda):
    """An edit of a numeric constant of the active preset: new value = fn(current value)."""
    def edit(src):
        node = hyperparameters(src, cuda)[name]
        v = fn(_number(node.value))
        return apply_params(src, {name: repr(v)}, cuda)
    return edit


def edits(cuda):
    gains = {"expert-off": constant("EXPERT_LOSS_WEIGHT", lambda v: 0.0, cuda),
             "lr-x2": constant("LEARNING_RATE", lambda v: v * 2, cuda),
             "batch-half": constant("BATCH_SIZE", lambda v: v // 2, cuda)}
    losses = {"temperature-cap-2": constant("LOGIT_SCALE_MAX", lambda v: 2.0, cuda),
              "half-steps": lambda src: module_value(src, "TIME_BUDGET", BUDGET_EXPR + " / 2")}
    return gains, losses


def null(k):
    return lambda src: module_value(src, "SEED", f"{SEED_EXPR} + {1000 * k}")


def line_edit(old_src, new_src):
    """(old_text, new_text) for edit_file: the changed line, with a neighbour if it is not unique."""
    a, b = old_src.split("\n"), new_src.split("\n")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, "an edit must change one line"
    old, new = a[i] + "\n", b[i] + "\n"
    if old_src.count(old) > 1:
        old, new = a[i - 1] + "\n" + old, a[i - 1] + "\n" + new
    return old, new


def run_once(repo, env, seed, tag):
    run_env = dict(env, AUTORESEARCH_SEED=str(seed), AUTORESEARCH_RUN_DIR=os.path.join(repo, "runs", tag))
    p = subprocess.run(["./run.sh"], cwd=repo, env=run_env, capture_output=True, text=True)
    m = parse_metrics(p.stdout)
    if p.returncode != 0 or "val_mean_rank" not in m:
        sys.exit(f"run.sh failed ({tag}, seed {seed}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    shutil.rmtree(os.path.join(repo, "runs", tag), ignore_errors=True)
    return m["val_mean_rank"], m.get("num_steps")


def calibrate(repo, env, variants, seeds):
    """{name: [val_mean_rank of seeds 1..S]}; each variant is a function of the template's train.py. The steps each
    run made are printed: far fewer than its neighbours' means the machine was busy with something else."""
    path = os.path.join(repo, "train.py")
    template = open(path).read()
    values = {}
    try:
        for name, edit in variants.items():
            with open(path, "w") as f:
                f.write(edit(template))
            runs = [run_once(repo, env, s, name) for s in range(1, seeds + 1)]
            values[name] = [v for v, _ in runs]
            print(f"calibration {name:<18} " + " ".join(f"{v:.2f} ({n or 0:.0f} steps)" for v, n in runs), flush=True)
    finally:
        with open(path, "w") as f:
            f.write(template)
    return values


def scripted_agent(repo, plan):
    """Two replies per experiment: the edit (computed from the current best train.py) and run_experiment."""
    script = []
    for label, edit in plan:
        def reply(req, edit=edit):
            src = open(os.path.join(repo, "train.py")).read()
            old, new = line_edit(src, edit(src))
            return tool_call("edit_file", path="train.py", old_text=old, new_text=new)
        script += [reply, tool_call("run_experiment", description=label)]
    return script


# ----------------------------------------------------------------------------------------------
# Monte Carlo of whole searches (issue 20). Every new rule is the engine's own: next_step, pooled_cv,
# incumbent_after_keep, round_winner drive the searches below exactly as the loop does. The old rule (one run
# per candidate against the mean of the K baseline runs, the engine's rule before issue 20) is re-implemented here,
# labelled OLD, for comparison only.
#
# The world: a metric to minimize, the baseline's true value 1. Candidate effects (the mix of the issue): 60% nulls,
# 5% each of gains of 5, 10 and 20%, 25% losses of 5-20% (uniform). A candidate's true value is the CURRENT
# incumbent's true value times (1 - gain): a keep moves the reference for every later candidate. A run's value is
# true * (1 + cv * N(0, 1)), and with the outlier variant, a share of the runs come from a slow machine: their value
# times outlier_factor (worse). Common random numbers: search i draws the same world (effects, and each candidate's
# and the incumbent's runs, in order) for every rule.

MC_METRIC = Metric("mc", "minimize")
MIX = (("null", 0.60, 0.0), ("+5%", 0.05, 0.05), ("+10%", 0.05, 0.10), ("+20%", 0.05, 0.20), ("loss", 0.25, None))
MAX_RUNS = 16        # runs drawn per candidate (and evaluation); no rule asks for more
MAX_INC = 400        # incumbent runs drawn per search


def mc_world(seed, i, n_cand, cv, outlier_rate, outlier_factor):
    import numpy as np
    rng = np.random.default_rng([seed, i])
    kind = rng.choice(len(MIX), size=n_cand, p=[p for _, p, _ in MIX])
    loss = rng.uniform(0.05, 0.20, n_cand)
    gain = np.where(kind == len(MIX) - 1, -loss, np.array([g or 0.0 for _, _, g in MIX])[kind])

    def noise(*shape):
        z = 1 + cv * rng.standard_normal(shape)
        return z * np.where(rng.random(shape) < outlier_rate, outlier_factor, 1.0)
    return {"kind": kind.tolist(), "gain": gain.tolist(), "cand": noise(n_cand, 2, MAX_RUNS).tolist(),
            "inc": noise(MAX_INC).tolist()}


class Search:
    """One search's bookkeeping: runs spent (the budget counts every run, the baseline's included), the incumbent's
    true value, and what each proposal came to."""
    def __init__(self, w, budget):
        self.w, self.budget, self.used, self.inc_used = w, budget, 0, 0
        self.true_base = self.true_inc = 1.0
        self.kept = {}          # proposal -> True (kept) / False (a verdict, not kept)
        self.final = None       # the last keep: (the mean it was decided on, the kept commit's runs, how many of those)

    def afford(self):
        return self.used < self.budget

    def inc_run(self):
        self.used += 1
        self.inc_used += 1
        return self.true_inc * self.w["inc"][self.inc_used - 1]

    def cand_run(self, p, attempt, k):
        self.used += 1
        return self.true_inc * (1 - self.w["gain"][p]) * self.w["cand"][p][attempt][k]

    def result(self, best, s=None):
        g = lambda v, true: (true - v) / true * 100   # how much better v looks than true, in % of true
        decided, runs, n = self.final if self.final else (None, [], 0)
        honest = runs[n:]     # the runs made after the keep: its one more run, the incumbent's re-measures since
        return {"kept": self.kept, "kind": {p: MIX[self.w["kind"][p]][0] for p in self.kept}, "runs": self.used,
                "gain": g(self.true_inc, self.true_base),
                "decided": None if decided is None else g(decided, self.true_inc),
                "best": None if decided is None else g(best, self.true_inc),
                "honest": g(sum(honest) / len(honest), self.true_inc) if honest and decided is not None else None,
                "s": s}


def search_new(rule, w, n_cand, budget, k_base, workers=1, requeue=False, first_in_s=False):
    """One search with an engine rule (RULES[...]) run as the loop runs it: each candidate through next_step
    against the round's incumbent, s = pooled_cv at every step (over the baseline's runs and those of every commit
    with >= 2 runs, less a candidate's first run unless first_in_s), the incumbent's re-measures counted per round,
    round_winner among the kept, incumbent_after_keep with one more run. With requeue, a runner-up kept but
    beaten is tried once more in the next round, its effect now on top of the new incumbent (ideas that compose)."""
    S = Search(w, budget)
    inc = [S.inc_run() for _ in range(k_base)]
    groups = [(inc, 0)]                     # (runs, how many leading runs stay out of s)
    queue, fresh, attempt, seen = [], iter(range(n_cand)), {}, None
    while True:
        todo = queue[:workers]
        queue = queue[workers:]
        todo += [p for _, p in zip(range(workers - len(todo)), fresh)]
        if not todo or not S.afford():
            break
        runs, steps, remeasured, out = {p: [] for p in todo}, {}, 0, False
        for p in todo:                      # every worker's first run, then each one to its verdict
            if not S.afford():
                out = True
                break
            runs[p].append(S.cand_run(p, attempt.get(p, 0), 0))
        for p in todo:
            while not out:
                if seen != (len(groups), len(inc)):   # s as the loop has it at every step (cached: the same value)
                    s, seen = pooled_cv([g[skip:] for g, skip in groups]), (len(groups), len(inc))
                step = next_step(rule, MC_METRIC, inc, runs[p], s, remeasured)
                if step.action in ("keep", "discard"):
                    steps[p] = step.action
                    break
                if not S.afford():
                    out = True
                elif step.action == "incumbent":
                    inc.append(S.inc_run())
                    remeasured += 1
                else:
                    runs[p].append(S.cand_run(p, attempt.get(p, 0), len(runs[p])))
        kept = {p: runs[p] for p in steps if steps[p] == "keep"}
        winner = round_winner(MC_METRIC, kept)
        for p in steps:
            S.kept[p] = S.kept.get(p, False) or p == winner
            if p != winner and len(runs[p]) >= 2:
                groups.append((runs[p], 1 - first_in_s))
            if requeue and p in kept and p != winner and attempt.get(p, 0) == 0:
                attempt[p] = 1
                queue.append(p)
        if winner is not None:
            one_more = S.cand_run(winner, attempt.get(winner, 0), len(runs[winner])) if S.afford() else None
            inc = incumbent_after_keep(runs[winner], one_more)
            S.true_inc *= 1 - w["gain"][winner]
            groups.append((inc, 1 - first_in_s))
            S.final = (sum(runs[winner]) / len(runs[winner]), inc, len(runs[winner]))   # inc[n:]: honest
        if out:
            break
    s = pooled_cv([g[skip:] for g, skip in groups])
    return S.result(incumbent_mean(inc, s)[0] if S.final and s else None, s)


def old_pooled_sigma(groups):
    """OLD rule: the run-to-run SD in the metric's units, pooled over groups of >= 2 runs."""
    ss = dof = 0
    for g in groups:
        if len(g) >= 2:
            m = sum(g) / len(g)
            ss, dof = ss + sum((x - m) ** 2 for x in g), dof + len(g) - 1
    return math.sqrt(ss / dof) if dof else None


def old_sidak_z(z, n):
    nd = statistics.NormalDist()
    return z if n == 1 else -nd.inv_cdf(-math.expm1(math.log1p(-nd.cdf(-z)) / n))


def search_old(w, n_cand, budget, k_base, workers=1, z=2.0, floor=0.01):
    """OLD rule, for comparison only (the engine's decide/decide_round before issue 20): best = mean of the K
    baseline runs; a candidate gets one run and is kept iff best - v1 > max(z_N * sigma, floor * |best|), z_N =
    Šidák's z for the best of N workers, the best of those passing kept; after a keep one more run, which never
    revokes it, and best = mean of the two; sigma pooled in absolute units over the baseline and each keep's pair."""
    S = Search(w, budget)
    base = [S.inc_run() for _ in range(k_base)]
    groups, best, zn = [base], sum(base) / k_base, old_sidak_z(z, workers)
    fresh = iter(range(n_cand))
    while S.afford():
        todo = [p for _, p in zip(range(workers), fresh)]
        if not todo:
            break
        sigma = old_pooled_sigma(groups)
        threshold = max(zn * sigma, floor * abs(best)) if sigma else floor * abs(best)
        v = {}
        for p in todo:
            if S.afford():
                v[p] = S.cand_run(p, 0, 0)
        passing = [p for p in v if MC_METRIC.gain(v[p], best) > threshold]
        winner = max(passing, key=lambda p: MC_METRIC.gain(v[p], best), default=None)
        for p in v:
            S.kept[p] = p == winner
        if winner is not None:
            pair = [v[winner]] + ([S.cand_run(winner, 0, 1)] if S.afford() else [])
            S.true_inc *= 1 - w["gain"][winner]
            groups.append(pair)
            best = sum(pair) / len(pair)
            S.final = (v[winner], pair, 1)
    return S.result(best if S.final else None, old_pooled_sigma(groups) / abs(best))


MC_RULES = {   # label -> (search function, keyword arguments; workers None: --mc-workers; plain: no outlier trimming)
    "OLD: one run, z 2 (today)": (search_old, {}),
    "screen, then confirm": (search_new, {"rule": "screen"}),
    "sequential (strict)": (search_new, {"rule": "sequential"}),
    "screen, plain s (no trimming)": (search_new, {"rule": "screen", "plain": True}),
    "screen, first runs in s": (search_new, {"rule": "screen", "first_in_s": True}),
    "OLD workers, Sidak": (search_old, {"workers": None}),
    "screen, workers": (search_new, {"rule": "screen", "workers": None}),
    "screen, workers, re-queue": (search_new, {"rule": "screen", "workers": None, "requeue": True}),
}


def mc_task(args):
    """Searches lo..hi-1 of one (rule, scenario): a list of Search.result dicts."""
    label, lo, hi, o = args
    fn, kw = MC_RULES[label]
    kw = dict(kw)
    if "rule" in kw:
        kw["rule"] = RULES[kw["rule"]]
    if kw.get("workers", 1) is None:
        kw["workers"] = o["workers"]
    cut, engine.judge.OUTLIER_T = engine.judge.OUTLIER_T, math.inf if kw.pop("plain", False) else engine.judge.OUTLIER_T
    try:
        return [fn(w=mc_world(o["seed"], i, o["n_world"], o["cv"], o["outlier_rate"], o["outlier_factor"]),
                   n_cand=o["n_cand"], budget=o["budget"], k_base=o["k"], **kw) for i in range(lo, hi)]
    finally:
        engine.judge.OUTLIER_T = cut


def mc_summary(results, k_base):
    """Rates over searches: P(keep) per kind of candidate among those that got a verdict, runs per candidate, the mean
    final true gain (%), and how much better than true the final incumbent looks (%), by its decided mean, the
    loop's best at the end, and the runs made after its keep (honest); the last three over searches with a keep."""
    seen, kept = {}, {}
    runs = cands = 0
    for r in results:
        for p, k in r["kept"].items():
            name = r["kind"][p]
            seen[name] = seen.get(name, 0) + 1
            kept[name] = kept.get(name, 0) + k
        runs += r["runs"] - k_base
        cands += len(r["kept"])
    mean = lambda key: statistics.fmean([r[key] for r in results if r[key] is not None] or [math.nan])
    out = {name: kept.get(name, 0) / seen[name] if seen.get(name) else math.nan for name, _, _ in MIX}
    out.update(cands=cands / len(results), runs_per_cand=runs / max(cands, 1), gain=mean("gain"),
               decided=mean("decided"), best=mean("best"), honest=mean("honest"), s=mean("s"))
    return out


def monte_carlo(o, rules, procs=1):
    """{label: mc_summary} for each label of MC_RULES in `rules`, over searches 0..o["searches"]-1 (common random
    numbers: search i sees the same world under every rule), in `procs` processes."""
    step = -(-o["searches"] // max(1, procs * 4))
    tasks = [(label, lo, min(lo + step, o["searches"]), o) for label in rules for lo in range(0, o["searches"], step)]
    if procs > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            parts = pool.map(mc_task, tasks)
    else:
        parts = list(map(mc_task, tasks))
    return {label: mc_summary([r for (lab, *_), part in zip(tasks, parts) if lab == label for r in part], o["k"])
            for label in rules}


def mc_report(a):
    """The Monte Carlo tables (--mc-searches): for each scenario (noise only; with outlier runs), every rule over a
    fixed number of candidates, and at equal compute (the same total number of runs, the baseline's included)."""
    import time
    t0 = time.time()
    base = dict(seed=a.mc_seed, searches=a.mc_searches, n_world=max(a.mc_candidates, a.mc_budget), k=a.mc_noise_runs,
                cv=a.mc_cv, outlier_factor=a.mc_outlier_factor, workers=a.mc_workers)
    print(f"Monte Carlo of whole searches: {a.mc_searches} searches (seed {a.mc_seed}), a metric to minimize, run "
          f"noise "
          f"cv {a.mc_cv:.1%}, baseline K = {a.mc_noise_runs}; candidates: " +
          ", ".join(f"{p:.0%} {name}" for name, p, _ in MIX) + " (losses 5-20%); workers N = "
          f"{a.mc_workers}. Rates: P(keep) per candidate that got a verdict. Gains and biases in % of the true value: "
          "final = the true gain of the final incumbent over the baseline; decided/best/honest - true = how much "
          "better than its true value the final incumbent looks by the mean its keep was decided on / the loop's "
          "best at the end / the runs made after its keep (searches with a keep).")
    scenarios = [("noise only", 0.0, list(MC_RULES)),
                 (f"{a.mc_outliers:.0%} of runs from a slow machine (value x{a.mc_outlier_factor:g}, worse)",
                  a.mc_outliers, [r for r in MC_RULES if "workers" not in r])]
    for title, rate, rules in scenarios:
        o = dict(base, outlier_rate=rate)
        fixed = monte_carlo(dict(o, n_cand=a.mc_candidates, budget=math.inf), rules, a.mc_procs)
        equal = monte_carlo(dict(o, n_cand=max(a.mc_candidates, a.mc_budget), budget=a.mc_budget), rules, a.mc_procs)
        print(f"\n{title}: {a.mc_candidates} candidates | equal compute, {a.mc_budget} runs in all\n")
        print("| rule | nulls kept | losses kept | +5% | +10% | +20% | runs/cand | final gain | decided - true | "
              "best - true | honest - true | s/cv | gain at equal compute | cands seen | nulls kept |")
        print("|---" * 15 + "|")
        for r in rules:
            f, e = fixed[r], equal[r]
            print(f"| {r} | {f['null']:.2%} | {f['loss']:.2%} | {f['+5%']:.0%} | {f['+10%']:.0%} | {f['+20%']:.0%} | "
                  f"{f['runs_per_cand']:.2f} | {f['gain']:.1f}% | {f['decided']:.1f}% | {f['best']:.1f}% | "
                  f"{f['honest']:.1f}% | {f['s'] / a.mc_cv:.2f} | {e['gain']:.1f}% | {e['cands']:.1f} | "
                  f"{e['null']:.2%} |")
        old, new = equal["OLD: one run, z 2 (today)"], equal["screen, then confirm"]
        print(f"\nat equal compute, screen-confirm against today's rule: final gain x{new['gain'] / old['gain']:.2f}, "
              f"nulls kept {new['null']:.2%} against {old['null']:.2%}, decided - true {new['decided']:.1f}% against "
              f"{old['decided']:.1f}% (x{new['decided'] / old['decided']:.2f})")
    print(f"\n({time.time() - t0:.0f} s)")

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=300, help="training seconds per run (the default CPU budget)")
    ap.add_argument("--n-train", type=int, help="synthetic training examples (default: prepare_data.py's)")
    ap.add_argument("--n-val", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--calib-seeds", type=int, default=3, help="seeds per variant in the calibration (>= 3)")
    ap.add_argument("--gains", nargs="+", default=["expert-off", "lr-x2", "batch-half"])
    ap.add_argument("--nulls", type=int, default=4)
    ap.add_argument("--noise-runs", type=int, default=5)
    ap.add_argument("--rule", default="screen", help="the loop's --rule")
    ap.add_argument("--calibration", help="a JSON file: read the calibration from it if it exists, else write it "
                    "there (to rerun the loop with other keep-rule flags without recalibrating)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (repo, logs, results.tsv)")
    mc = ap.add_argument_group("Monte Carlo of whole searches (issue 20): with --mc-searches, only that runs")
    mc.add_argument("--mc-searches", type=int, help="searches per rule and scenario (4000: about 4 minutes on 2 cores)")
    mc.add_argument("--mc-candidates", type=int, default=40, help="candidates per search")
    mc.add_argument("--mc-budget", type=int, default=47,
                    help="runs per search at equal compute, the baseline's included")
    mc.add_argument("--mc-noise-runs", type=int, default=5, help="the baseline's runs (K)")
    mc.add_argument("--mc-cv", type=float, default=0.075, help="run-to-run noise, relative")
    mc.add_argument("--mc-outliers", type=float, default=0.02, help="share of runs from a slow machine")
    mc.add_argument("--mc-outlier-factor", type=float, default=2.0, help="their value, times this (worse)")
    mc.add_argument("--mc-workers", type=int, default=4, help="N for the workers' rows")
    mc.add_argument("--mc-seed", type=int, default=0)
    mc.add_argument("--mc-procs", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args()
    if a.mc_searches:
        return mc_report(a)
    if a.calib_seeds < 2:
        ap.error("--calib-seeds must be at least 2 (3 or more for figures worth reporting)")
    import torch
    cuda = torch.cuda.is_available()
    all_gains, losses = edits(cuda)
    gains = {n: all_gains[n] for n in a.gains}
    tmp = tempfile.mkdtemp(prefix="bench-research-")
    try:
        data, repo = os.path.join(tmp, "data"), os.path.join(tmp, "repo")
        sizes = [f for k in ("n_train", "n_val", "n_test") if getattr(a, k)
                 for f in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", data, *sizes], check=True,
                       capture_output=True)
        os.mkdir(repo)
        copy_into(repo, FILES)
        env = dict(os.environ, AUTORESEARCH_DATA=data, AUTORESEARCH_TIME_BUDGET=str(a.budget),
                   GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
        env.setdefault("AUTORESEARCH_IMAGE", "host")

        if a.calibration and os.path.exists(a.calibration):
            with open(a.calibration) as f:
                values = json.load(f)
            print(f"calibration from {a.calibration}: " + ", ".join(f"{n} {v}" for n, v in values.items()))
            if set(gains) - set(values):
                sys.exit(f"{a.calibration} has no runs of {', '.join(sorted(set(gains) - set(values)))}")
        else:
            values = calibrate(repo, env, {"baseline": lambda s: s, "null": null(99), **gains}, a.calib_seeds)
            if a.calibration:
                with open(a.calibration, "w") as f:
                    json.dump(values, f)
        base = values["baseline"]
        real = [n for n in gains if statistics.mean(base) - statistics.mean(values[n]) >
                2 * math.sqrt(statistics.variance(base) / len(base) + statistics.variance(values[n]) / len(values[n]))]

        plan, order = [], [[("null", f"null {k + 1}", null(k + 1)) for k in range(a.nulls)],
                           [("gain", n, e) for n, e in gains.items()], [("loss", n, e) for n, e in losses.items()]]
        for i in range(max(map(len, order))):   # interleaved: null, gain, loss, null, ...
            plan += [item for group in order for item in group[i:i + 1]]
        for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "template"]):
            subprocess.run(["git", *cmd], cwd=repo, check=True, env=env, capture_output=True)
        flags = ["--tag", "bench", "--max-experiments", str(len(plan)), "--noise-runs", str(a.noise_runs),
                 "--rule", a.rule, "--fix-attempts", "0"]
        with FakeOllama({"qwen2.5-coder:7b": 32768}, scripted_agent(repo, [(f"{kind}: {n}", e) for kind, n, e in plan])
                        ) as fake:
            p = subprocess.run([sys.executable, "autoresearch.py", *flags], cwd=repo,
                               env=dict(env, OLLAMA_HOST=fake.url), capture_output=True, text=True)
            if p.returncode != 0 or fake.remaining:
                sys.exit(f"the loop failed (exit {p.returncode}, {fake.remaining} scripted replies left):\n"
                         f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        rows = load_results(os.path.join(repo, "results.tsv"))
        status = {r["description"]: r["status"] for r in rows if r["status"] != "baseline"}
        assert len(status) == len(plan), status

        def kept(kind, names=None):
            labels = [f"{kind}: {n}" for k, n, _ in plan if k == kind and (names is None or n in names)]
            return f"{sum(status[x] == 'keep' for x in labels)}/{len(labels)}"
        print(f"\nthe loop ({' '.join(flags[2:])}, budget {a.budget}s, {a.calib_seeds}-seed calibration):")
        for r in rows:
            print(f"  exp {r['experiment']:>2} {r['status']:<9} {r['val_mean_rank'] or '-':>8}  {r['description']}")
        print(f"real gains detected: {kept('gain', real)} (real: {', '.join(real) or 'none'}; all "
              f"candidates kept {kept('gain')})")
        print(f"false keeps: nulls {kept('null')}, losses {kept('loss')}")
        keeps = [r for r in rows if r["status"] == "keep"]
        print("the candidate's runs each keep rests on: " + (", ".join(
            f"exp {r['experiment']} {len(runs_of(r))}" for r in keeps) or "no keep"))
        best, best_commit, _, _ = state_from_rows(rows)
        scores = load_test_scores(project_metric(repo), os.path.join(repo, TEST_SCORES))
        b_test, t_test = scores.get(rows[0]["commit"]), scores.get(best_commit)
        if best_commit == rows[0]["commit"]:
            print(f"final best: the baseline (nothing kept); test_mean_rank {b_test}")
        else:
            print(f"final best val {best:.4g} vs baseline {float(rows[0]['best']):.4g}; on test {t_test} vs {b_test}: "
                  f"{'beats' if t_test is not None and b_test is not None and t_test < b_test else 'does NOT beat'} "
                  f"the baseline")
        same = [x - y for x, y in zip(runs_of(rows[0]), base)]
        spread = f" (sd {statistics.stdev(same):.3g}; of two independent runs: {statistics.stdev(base) * 2 ** 0.5:.3g})"
        print(f"the same code on the same seeds, the loop's baseline minus the calibration's: "
              f"{' '.join(f'{d:+.3g}' for d in same)}{spread * (len(same) > 1)}")
        if a.keep:
            print(f"\nkept {tmp}")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
