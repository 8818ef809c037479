"""Benchmark (issue 10 §3): how much can a keep be trusted?

    python tests/bench_research.py --calibration calib.json    # the full benchmark: default data and budget
    python tests/bench_research.py --calibration calib.json --noise-runs 3   # the loop again with other rule flags
    python tests/bench_research.py --budget 3 --n-train 300 --n-val 100 --n-test 100 --gains expert-off \\
        --nulls 1 --calib-seeds 3 --noise-runs 2     # a smoke run (minutes; its figures mean nothing)

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
   baseline and the loop's); and the power of the keep rule at one run per experiment (power_table).
"""
import argparse
import ast
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import autoresearch as ar  # noqa: E402
from conftest import copy_into  # noqa: E402
from fake_ollama import FakeOllama, tool_call  # noqa: E402

FILES = ["autoresearch.py", "engine", "train.py", "run.sh", "evaluator.py", "prepare_data.py", "program.md", "scratchpad.md",
         ".gitignore"]
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
        node = ar.hyperparameters(src, cuda)[name]
        v = fn(ar._number(node.value))
        return ar.apply_params(src, {name: repr(v)}, cuda)
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
    m = ar.parse_metrics(p.stdout)
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


def p_keep(gain, sd, sigma_of, z, floor, trials=20000, seed=0):
    """Monte Carlo P(keep) of a candidate whose true gain is `gain`, its measured gain off by N(0, sd), judged with
    threshold max(z * s, floor), s an estimate of the noise drawn as the loop makes it (sigma_of(rng))."""
    rng = random.Random(seed)
    return sum(rng.gauss(gain, sd) > max(z * sigma_of(rng), floor) for _ in range(trials)) / trials


def sd_estimate(sd, groups, size):
    """sigma_of for p_keep: the pooled sd of `groups` groups of `size` runs each of true sd `sd`."""
    def draw(rng):
        ss = 0.0
        for _ in range(groups):
            g = [rng.gauss(0, sd) for _ in range(size)]
            ss += sum((x - sum(g) / size) ** 2 for x in g)
        return math.sqrt(ss / (groups * (size - 1)))
    return draw


def power_table(values, gains, real, a):
    """P(keep) at one candidate run per experiment (equal compute), with the noise estimated as the loop estimates it
    (sigma from the K-run baseline: its own sampling error counts), for: the rule as it is (candidate against the mean
    of the K runs), other K and z, and common random numbers (candidate and best on the same seed, the rule applied to
    their difference, its sigma pooled from two experiments run twice). The true sigmas come from the calibration."""
    base = values["baseline"]
    sigma, best = statistics.stdev(base), statistics.mean(base)
    floor = a.floor * best
    sd_pair = ar.pooled_sigma([[c - b for c, b in zip(values[n], base)] for n in gains])   # edit vs best, same seed
    print(f"\nsigma of one run {sigma:.3g} ({sigma / best:.1%} of {best:.4g}); sd of a paired difference (an edit and "
          f"the baseline on the same seed) {sd_pair:.3g}, against {sigma * math.sqrt(2):.3g} for two independent runs")

    def as_it_is(k, z):   # the candidate against the mean of k runs: off by sigma * sqrt(1 + 1/k)
        return lambda g, psd: p_keep(g, sigma * math.sqrt(1 + 1 / k), sd_estimate(sigma, 1, k), z, floor)
    kz = dict.fromkeys(((a.noise_runs, a.z), (3, a.z), (5, a.z), (a.noise_runs, 1.5), (a.noise_runs, 2.5)))
    rules = [(f"K {k}, z {z}", as_it_is(k, z)) for k, z in kz]
    rules.append((f"paired, z {a.z}", lambda g, psd: p_keep(g, psd, sd_estimate(sd_pair, 2, 2), a.z, floor)))
    # a paired difference is off by sd_pair; a seed-only null's by sigma * sqrt(2): a new random stream never pairs
    rows = [("seed-only null", 0.0, sigma * math.sqrt(2))] + \
        [(f"{n}{' (real)' if n in real else ''}", best - statistics.mean(values[n]), sd_pair) for n in gains] + \
        [(f"gain of {p:.0%}", p * best, sd_pair) for p in (0.05, 0.1, 0.2)]
    print(f"{'P(keep)':<22}{'true gain':>10}" + "".join(f"{name:>14}" for name, _ in rules))
    for label, g, psd in rows:
        print(f"{label:<22}{g:>10.3g}" + "".join(f"{rule(g, psd):>14.0%}" for _, rule in rules))


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
    ap.add_argument("--z", type=float, default=2.0)
    ap.add_argument("--floor", type=float, default=0.01)
    ap.add_argument("--confirm", action="store_true")
    ap.add_argument("--calibration", help="a JSON file: read the calibration from it if it exists, else write it "
                    "there (to rerun the loop with other keep-rule flags without recalibrating)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (repo, logs, results.tsv)")
    a = ap.parse_args()
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
                 "--z", str(a.z), "--floor", str(a.floor), "--fix-attempts", "0"] + (["--confirm"] if a.confirm else [])
        with FakeOllama({"qwen2.5-coder:7b": 32768}, scripted_agent(repo, [(f"{kind}: {n}", e) for kind, n, e in plan])
                        ) as fake:
            p = subprocess.run([sys.executable, "autoresearch.py", *flags], cwd=repo,
                               env=dict(env, OLLAMA_HOST=fake.url), capture_output=True, text=True)
            if p.returncode != 0 or fake.remaining:
                sys.exit(f"the loop failed (exit {p.returncode}, {fake.remaining} scripted replies left):\n"
                         f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        rows = ar.load_results(os.path.join(repo, "results.tsv"))
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
        best, best_commit, _, _ = ar.state_from_rows(rows)
        scores = ar.load_test_scores(ar.project_metric(repo), os.path.join(repo, ar.TEST_SCORES))
        b_test, t_test = scores.get(rows[0]["commit"]), scores.get(best_commit)
        if best_commit == rows[0]["commit"]:
            print(f"final best: the baseline (nothing kept); test_mean_rank {b_test}")
        else:
            print(f"final best val {best:.4g} vs baseline {float(rows[0]['best']):.4g}; on test {t_test} vs {b_test}: "
                  f"{'beats' if t_test is not None and b_test is not None and t_test < b_test else 'does NOT beat'} "
                  f"the baseline")
        same = [x - y for x, y in zip(ar.runs_of(rows[0]), base)]
        spread = f" (sd {statistics.stdev(same):.3g}; of two independent runs: {statistics.stdev(base) * 2 ** 0.5:.3g})"
        print(f"the same code on the same seeds, the loop's baseline minus the calibration's: "
              f"{' '.join(f'{d:+.3g}' for d in same)}{spread * (len(same) > 1)}")
        power_table(values, gains, real, a)
        if a.keep:
            print(f"\nkept {tmp}")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
