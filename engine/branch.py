"""The branch autoresearch/<tag>: each experiment's commits (a candidate in its worker's worktree, the keep commit
amended from it), the notes that survive every revert, the hand-offs kept for report --test, and what a loop killed
with -9 left behind, reconciled on --resume."""
import difflib
import os
import re
import shutil

from engine.agent import read_scratchpad
from engine.repo import git, sweep_worktrees
from engine.results import (cell, commit_message, load_results, parse_trailers, pending_baseline, runs_of,
                            state_from_rows, typed_row, upgrade_results)
from engine.runs import stop_orphan
from engine.util import HarnessError, RESULTS, SCRATCHPAD, TRAIN, WORKTREES, num, read_text, say, write_text
from engine.verdicts import Status


def commit_candidate(o, path, metric):
    """The worker's edits as one candidate commit on top of the round's best (after fixes too), in its worktree."""
    git("reset", "-q", "--soft", o.base, cwd=path)
    git("add", TRAIN, SCRATCHPAD, cwd=path)
    git("commit", "-q", "--no-verify", "--allow-empty", "-m", commit_message(
        o.experiment, o.description, o.phase, "candidate", metric, extra={"Round": o.round, "Worker": o.worker}),
        cwd=path)
    o.commit = git("rev-parse", "HEAD", cwd=path)


def commit_keep(o, metric):
    """The kept candidate at the branch's HEAD, amended into the keep commit. Its trailers carry the decision, so that
    --resume records a keep whose row a kill -9 cut short (in the run made after the keep, say)."""
    git("reset", "-q", "--hard", o.commit)
    trailers = {"Runs": cell(o.values), "Incumbent-Runs": cell(o.inc_runs), "T": cell(o.t),
                "Threshold": cell(o.threshold), "Round": o.round, "Worker": o.worker}
    git("commit", "-q", "--no-verify", "--amend", "-m", commit_message(
        o.experiment, o.description, o.phase, Status.KEEP, metric, o.values[0], o.delta, trailers))
    o.commit = git("rev-parse", "HEAD")


def save_notes(scratch, why):
    """scratchpad.md survives reverts: write it back and commit it on its own."""
    if scratch is None or not os.path.exists(SCRATCHPAD) or read_text(SCRATCHPAD) == scratch:
        return
    write_text(SCRATCHPAD, scratch)
    git("add", SCRATCHPAD)
    git("commit", "-q", "--no-verify", "-m", f"scratchpad: {why}")


def merge_scratchpads(base, finals):
    """Pure. The round's scratchpad: base (the notes at the round's start) and, under a heading per experiment, the
    lines each worker added or rewrote ({experiment: its final scratchpad}). A worker that deleted or condensed base
    lines deletes them for nobody; a note already present (in base or from an earlier worker) is not repeated."""
    out = base.rstrip("\n").split("\n") if base.strip() else []
    seen = {line.strip() for line in out if line.strip()}
    old = base.split("\n")
    for exp, text in finals.items():
        new = text.split("\n")
        added = [line for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
                 if tag in ("insert", "replace") for line in new[j1:j2]]
        added = [line for line in added if line.strip() and line.strip() not in seen]
        if added:
            out += [""] * bool(out) + [f"## Notes of experiment {exp}", *added]
            seen.update(line.strip() for line in added)
    return "\n".join(out) + "\n"


def round_notes(start, workers):
    """The notes after a round: one worker's own scratchpad as it left it (condensed, if it condensed it); several
    workers' new lines merged onto the notes the round started from."""
    finals = {w.o.experiment: read_text(os.path.join(w.path, SCRATCHPAD)) for w in workers
              if os.path.exists(os.path.join(w.path, SCRATCHPAD))}
    if len(workers) == 1:
        return next(iter(finals.values()), None)
    return merge_scratchpads(start, finals)


def cleanup_runs(rows):
    """Hand-offs are kept for the baseline and the best (report --test), and a baseline's that --resume continues."""
    _, _, best_exp, base_exp = state_from_rows(rows)
    pending = pending_baseline(rows)
    keep = {f"runs/{best_exp}", f"runs/{base_exp}", f"runs/{pending and pending['experiment']}"}
    for d in os.listdir("runs") if os.path.isdir("runs") else []:
        if f"runs/{d}" not in keep and re.fullmatch(r"\d+(-[si]\d+)?", d):
            shutil.rmtree(f"runs/{d}", ignore_errors=True)


def start(loop):
    """A new run: its branch from HEAD, refused where the branch or results of an earlier run exist."""
    if git("rev-parse", "--verify", "-q", f"refs/heads/{loop.branch}", check=False):
        raise HarnessError(f"branch {loop.branch} already exists: pass --resume, or a new --tag")
    if load_results():
        raise HarnessError(f"{RESULTS} holds results of an earlier run: pass --resume --tag TAG, "
                           f"or move it away (mv {RESULTS} results-old.tsv)")
    sweep_worktrees()
    git("checkout", "-q", "-b", loop.branch)


def resume(loop):
    """--resume: the rows back, the branch checked out on the best commit, and what a kill -9 cut short recorded: a keep
    whose row never got written (from its commit's trailers), candidates in flight (interrupted), the workers' notes."""
    if not git("rev-parse", "--verify", "-q", f"refs/heads/{loop.branch}", check=False):
        raise HarnessError(f"nothing to resume: branch {loop.branch} does not exist (check --tag)")
    loop.rows = [typed_row(r, loop.metric) for r in load_results(metric=loop.metric)]
    upgrade_results(loop.metric)
    scratch = read_scratchpad()
    git("checkout", "-q", "-f", loop.branch)
    target = state_from_rows(loop.rows)[1]
    round_start = None   # the notes a recovered round started from
    head = git("rev-parse", "HEAD")
    if target and head != target and recover_head(loop, head, target):
        round_start, target = git("show", f"{target}:{SCRATCHPAD}", check=False), head
    notes = recover_workers(loop, target)
    git("reset", "-q", "--hard", target or "HEAD")   # drop half-done edits; the notes are restored below
    save_notes(scratch, "notes recovered on resume")
    if notes:   # onto the notes the round started from: a recovered winner's own are in its keep commit
        base = read_scratchpad() if round_start is None else round_start
        save_notes(merge_scratchpads(base or "", notes), "notes of workers recovered on resume")
    sweep_worktrees()
    cleanup_runs(loop.rows)    # hand-offs of runs that were cut short
    say(f"autoresearch: resuming {loop.branch} with {len(loop.rows)} recorded experiments")


def recover_head(loop, head, target):
    """The branch's HEAD is past the best commit: a keep commit whose row a kill -9 cut short is recorded from its
    trailers (True: it is the best now); a candidate commit left there by an older harness is recorded interrupted."""
    tr = parse_trailers(git("log", "-1", "--format=%B", head))
    exp = tr.get("Experiment", "")
    if not exp.isdigit() or int(exp) in {r["experiment"] for r in loop.rows}:
        return False
    where = {k.lower(): int(tr[k]) for k in ("Round", "Worker") if tr.get(k, "").isdigit()}
    o = loop.outcome(int(exp), commit=head, description=tr.get("Hypothesis", ""), phase=tr.get("Phase", ""), **where)
    if tr.get("Status") == "keep":
        o.values, o.inc_runs = runs_of({"runs": tr.get("Runs")}), runs_of({"runs": tr.get("Incumbent-Runs")})
        o.delta, o.t, o.threshold = num(tr.get("Delta")), num(tr.get("T")), num(tr.get("Threshold"))
        o.status, o.reason = Status.KEEP, f"recovered from the keep commit on resume ({len(o.values)} run(s))"
    elif tr.get("Status") == "candidate":
        o.base, o.reason = target, "killed during the run; recovered on resume"
    else:
        return False
    loop.record(o)
    return o.status == Status.KEEP


def recover_workers(loop, base):
    """--resume after a kill -9 in a round: each worker's candidate commit (in its worktree) that has no row is
    recorded interrupted. Returns every worker's notes ({experiment, or the worker where it made no candidate:
    its scratchpad}); sweep_worktrees removes the worktrees afterwards."""
    notes = {}
    for d in sorted(os.listdir(WORKTREES)) if os.path.isdir(WORKTREES) else []:
        path = os.path.join(WORKTREES, d)
        head = git("rev-parse", "HEAD", cwd=path, check=False) if os.path.exists(os.path.join(path, ".git")) else ""
        tr = parse_trailers(git("log", "-1", "--format=%B", head, cwd=path)) if head else {}
        exp = tr.get("Experiment", "")
        cand = exp.isdigit() and tr.get("Status") == "candidate"
        if cand and int(exp) not in {r["experiment"] for r in loop.rows}:
            loop.record(loop.outcome(int(exp), commit=head, description=tr.get("Hypothesis", ""),
                                     phase=tr.get("Phase", ""), base=base, round=int(tr.get("Round", 0)),
                                     worker=int(tr.get("Worker", 0)), reason="killed during the run; recovered on "
                                                                             "resume"))
        if os.path.exists(os.path.join(path, SCRATCHPAD)):
            notes[exp if cand else f"? (worker {d[1:]}, stopped before its run)"] = read_text(
                os.path.join(path, SCRATCHPAD))
    return notes


def prepare(loop):
    """The branch for this run: stop what a killed loop left running, then start or resume."""
    os.makedirs("runs", exist_ok=True)
    stop_orphan()
    (resume if loop.args.resume else start)(loop)
