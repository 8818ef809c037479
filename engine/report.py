"""progress.png, the summary, the held-out test scores, and report --compare."""
import datetime
import io
import os
import subprocess

from engine.judge import parse_metrics
from engine.project import project_metric
from engine.repo import current_tag, spawn
from engine.results import load_results, runs_of, state_from_rows
from engine.runs import launch_argv
from engine.util import HarnessError, RESULTS, TEST_SCORES, fmt, num, read_text, write_text
from engine.verdicts import Status


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
    base = next((r for r in rows if r["status"] == Status.BASELINE), None)
    if not base:
        return None
    best, _, best_exp, _ = state_from_rows(rows)
    model_rows = [r for r in rows if r["status"] not in (Status.BASELINE, Status.INTERRUPTED)]
    keeps = sum(r["status"] == Status.KEEP for r in model_rows)
    wall = wall_seconds(rows)
    train = sum(num(r["run_seconds"]) or 0 for r in rows)
    slots = {}
    for r in rows:
        k = int(num(r.get("worker")) or 0)
        slots[k] = slots.get(k, 0.0) + (num(r["run_seconds"]) or 0)
    model = sum(num(r["model_seconds"]) or 0 for r in rows)
    b = num(base["best"])
    return {"baseline": b, "baseline_runs": len(runs_of(base)), "best": best, "best_exp": best_exp,
            "honest": next((num(r.get("honest")) for r in reversed(rows) if num(r.get("honest")) is not None), None),
            "delta_pct": (best - b) / b * 100 if b else 0.0, "experiments": len(model_rows), "keeps": keeps,
            "keep_rate": keeps / len(model_rows) if model_rows else 0.0,
            "per_hour": len(model_rows) / (wall / 3600) if wall else 0.0,
            "train_share": train / wall if wall else 0.0, "model_share": model / wall if wall else 0.0,
            "crashes": sum(r["status"] in (Status.CRASH, Status.TIMEOUT) for r in model_rows),
            "slots": {k: v / wall if wall else 0.0 for k, v in slots.items()}}


def summary(rows, metric):
    s = summarize(rows)
    if not s:
        print("autoresearch: no baseline recorded yet")
        return
    print(f"{metric.column} ({metric.better} is better): baseline {s['baseline']:.4g} (the mean of its "
          f"{s['baseline_runs']} runs) -> best {s['best']:.4g} (exp {s['best_exp']}), {s['delta_pct']:+.1f}%; "
          f"honest best {fmt(s['honest']) or '-'} (its runs made after the keep)")
    print(f"{s['experiments']} experiments, {s['keeps']} kept ({s['keep_rate']:.0%}), {s['crashes']} crashed/"
          f"timed out, {s['per_hour']:.1f} experiments/hour")
    if len(s["slots"]) > 1:   # workers overlap: the shares below add up to more than the wall time
        print("slot utilization (training seconds / wall seconds): " +
              ", ".join(f"worker {k} {v:.0%}" for k, v in sorted(s["slots"].items())))
    print(f"wall time: {s['train_share']:.0%} training+evaluation, {s['model_share']:.0%} waiting for the model, "
          f"{max(0.0, 1 - s['train_share'] - s['model_share']):.0%} harness")


def write_report(rows, metric, path="progress.png", quiet=False):
    """progress.png: a dot per experiment's first run (grey discarded, green kept and labelled, a red x at the worse
    end for a failure), the running best the rule compared with (a step line, with its ±2σ noise band) and the honest
    best (dashed: the mean of the best commit's runs made after its keep)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    pts = [(int(r["experiment"]), num(r[metric.column]), r) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    shade_rounds(ax, pts)
    draw_points(ax, pts, metric)
    draw_best(ax, pts)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("experiment")
    ax.set_ylabel(f"{metric.column} ({metric.better} is better)")
    s = summarize(rows)
    ax.set_title("autoresearch progress" + (f": {s['baseline']:.4g} → {s['best']:.4g} ({s['delta_pct']:+.1f}%), "
                                            f"{s['keeps']}/{s['experiments']} kept" if s else ""))
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_text(path, png.getvalue())      # whole, as every file the harness writes
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")


def shade_rounds(ax, pts):
    """--workers: every other round shaded."""
    rounds = {}
    for x, _, r in pts:
        rounds.setdefault(round_of(r), []).append(x)
    if any(len(xs) > 1 for xs in rounds.values()):
        spans = sorted((min(xs), max(xs)) for xs in rounds.values())
        for i, (lo, hi) in enumerate(spans[1::2]):
            ax.axvspan(lo - 0.5, hi + 0.5, color="#1f77b4", alpha=0.07, lw=0, label=None if i else "a round (shaded "
                       "every other)", zorder=0)


def draw_points(ax, pts, metric):
    dis = [(x, y) for x, y, r in pts if y is not None and r["status"] == Status.DISCARD]
    if dis:
        ax.scatter(*zip(*dis), c="#b0b0b0", s=22, label="discarded", zorder=2)
    kept = [(x, y, r) for x, y, r in pts if y is not None and r["status"] in (Status.KEEP, Status.BASELINE)]
    if kept:
        ax.scatter([k[0] for k in kept], [k[1] for k in kept], c="#2ca02c", s=40, label="kept", zorder=3)
        for x, y, r in kept:
            ax.annotate(r["description"][:40], (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7,
                        color="#1b6e1b", rotation=20)
    ys = [y for _, y, _ in pts if y is not None]
    fails = [x for x, y, r in pts if r["status"] in (Status.CRASH, Status.TIMEOUT, Status.INVALID)]
    if fails:
        worst = (max if metric.direction == "minimize" else min)(ys) if ys else 1.0
        ax.scatter(fails, [worst] * len(fails), marker="x", c="#d62728", s=36, label="crash / timeout / invalid",
                   zorder=3)


def draw_best(ax, pts):
    """The running best with the noise band known after each row, and the honest best where there is one."""
    steps = [(x, num(r["best"]), 2 * (num(r.get("sigma")) or 0.0), num(r.get("honest"))) for x, _, r in pts
             if num(r["best"]) is not None]
    if not steps:
        return
    steps.append((max(x for x, _, _ in pts), *steps[-1][1:]))
    xs, bs, band, honest = zip(*steps)
    ax.step(xs, bs, where="post", c="#1b6e1b", lw=1.5, label="running best")   # darker than the kept dots on it
    ax.fill_between(xs, [b - w for b, w in zip(bs, band)], [b + w for b, w in zip(bs, band)], step="post",
                    color="#2ca02c", alpha=0.12, label="noise band (±2σ)")
    if any(h is not None for h in honest):
        ax.step(xs, [h if h is not None else b for h, b in zip(honest, bs)], where="post", c="#1b6e1b", lw=1,
                ls="--", label="honest best (runs after the keep)")


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


def compare_line(rows, scores, metric):
    """Pure. One run's figures for report --compare. A keep "survived" when the run made after it still beat the best
    before it; keeps without that run are not counted."""
    s = summarize(rows)
    _, best_commit, _, _ = state_from_rows(rows)
    checked = survived = 0
    for i, r in enumerate(rows):
        after = runs_of(r, "after_runs")
        before = next((num(p["best"]) for p in reversed(rows[:i]) if num(p["best"]) is not None), None)
        if r["status"] == Status.KEEP and after and before is not None:
            checked += 1
            survived += metric.gain(sum(after) / len(after), before) > 0
    sides = {}   # who proposed the trials (--agent hybrid has two): {proposer: [trials, keeps]}
    for r in rows:
        if r["status"] not in (Status.BASELINE, Status.INTERRUPTED):
            side = sides.setdefault(r.get("proposer") or r.get("agent") or "llm", [0, 0])
            side[0], side[1] = side[0] + 1, side[1] + (r["status"] == Status.KEEP)
    return {"agent": next((r["agent"] for r in reversed(rows) if r.get("agent")), "llm"), "best": s["best"],
            "test": scores.get(best_commit), "experiments": s["experiments"], "keeps": s["keeps"],
            "per_hour": s["per_hour"], "survived": survived, "checked": checked,
            "sides": sides}


def sides_text(sides):
    """Pure. 'llm 6 (30%), 2 keeps; optuna 14 (70%), 1 keep' from {proposer: [trials, keeps]}."""
    n = sum(t for t, _ in sides.values()) or 1
    return "; ".join(f"{p} {t} ({t / n:.0%}), {k} keep{'s' * (k != 1)}" for p, (t, k) in sorted(sides.items()))


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
          f"{'confirmed':>11}  by proposer: trials (share), keeps")
    for name, rows in runs:
        c = compare_line(rows, scores, metric)
        confirmed = f"{c['survived']}/{c['checked']}" if c["checked"] else "-"
        print(f"{name[:15]:<16}{c['agent']:<8}{c['experiments']:>12}{c['best']:>10.4g}{fmt(c['test']) or '-':>10}"
              f"{c['keeps']:>7}{c['per_hour']:>10.1f}{confirmed:>11}  {sides_text(c['sides'])}")
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
    write_report(rows, metric)
    summary(rows, metric)
    return report_test(rows, metric) if args.test else 0
