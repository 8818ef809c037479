"""The research loop: the baseline, then experiments (alone or in rounds of workers), each kept or reverted."""
import difflib
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from engine.agent import (CHARS_PER_TOKEN, EDITABLE, PROMPT_OTHER_CHARS, READABLE, READ_MAX_CHARS, SCRATCHPAD_MAX_CHARS,
    TOKEN_RESERVE, TOOLS, TOOL_RESULT_MAX, apply_edit, build_system_prompt, build_user_message, check_model, check_path,
    fill_metric, is_transient, ollama_error, parse_error, parse_phases, parse_tool_calls, phase_index, read_scratchpad,
    train_limit, unwritable)
from engine.judge import (ALLOWANCE_MIN, ALLOWANCE_SHARE, baseline_failure, budget_allowance, decide, decide_round,
    pooled_sigma, sidak_z)
from engine.project import project_metric
from engine.repo import dirty_files, git, sweep_worktrees, worktree
from engine.report import report_test, summary, write_report
from engine.results import (Outcome, append_row, cell, commit_message, decision_line, load_results, make_row,
    noise_groups, parse_trailers, pending_baseline, runs_of, state_from_rows, typed_row, upgrade_results)
from engine.runs import Run, cancel_run, check_sandbox, on_slurm, run_grace, run_sandbox, start_run, stop_orphan
from engine.util import (HarnessError, PROGRAM, RESULTS, SCRATCHPAD, TRAIN, WORKTREES, clean_text, data_dir, encodable,
    fmt, num, read_text, say, write_text)


def startup_checks(args, client):
    """Every failure is one message that names the fix (lock_repo has checked that this is a git checkout)."""
    top = git("rev-parse", "--show-toplevel")
    if os.path.realpath(top) != os.path.realpath(os.getcwd()):
        raise HarnessError(f"run autoresearch from the repository root: cd {top}")
    for f in (TRAIN, PROGRAM, "run.sh"):
        if not os.path.exists(f):
            raise HarnessError(f"{f} is missing in {os.getcwd()}")
    project_metric()   # declared, and declared right
    if git("rev-parse", "--verify", "-q", "HEAD", check=False) == "":
        raise HarnessError("the repository has no commit yet: git add -A && git commit -m init")
    dirty = dirty_files()
    allowed_dirty = set(EDITABLE) if args.resume else set()
    if set(dirty) - allowed_dirty:
        raise HarnessError("the working tree is not clean (" + ", ".join(sorted(dirty)[:5]) +
                           "): commit or stash your changes first (git status)")
    if not os.path.exists(os.path.join(data_dir(), "meta.json")):
        raise HarnessError(f"no prepared data in {data_dir()}/: run python prepare_data.py")
    if args.agent == "llm":   # a tuner agent proposes without a model
        check_model(args, client)
    check_sandbox(args)


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


@dataclass
class Worker:
    """One worker of a round: its slot, its worktree, its experiment and conversation, and its run in a thread."""
    index: int
    path: str
    slot: dict
    o: Outcome
    messages: list = field(default_factory=list)
    fixes: int = 0
    run: Run = None
    started: subprocess.Popen = None   # its run, waiting for its go while the model writes (start_run)
    error: BaseException = None
    thread: threading.Thread = None
    concluded: bool = False


class Loop:
    def __init__(self, args, agent, slots=None, alone=None):
        self.args, self.agent = args, agent  # the proposer: LLMAgent (agent.py) or a Tuner (tuners.py)
        self.slots = slots                   # --workers N: each worker's run environment (worker_slots, run_memory)
        self.alone = alone or {}             # the environment of a run alone on the machine (run_memory)
        self.branch = f"autoresearch/{args.tag}"
        self.metric = agent.metric
        self.phases = parse_phases(read_text(PROGRAM))
        self.last_log = None
        self.rows = []                       # typed (make_row); read from results.tsv only on --resume

    # --- state -----------------------------------------------------------------------------------
    @property
    def best(self):
        return state_from_rows(self.rows)[0]

    def sigma(self):
        return pooled_sigma(noise_groups(self.rows))

    def allowance(self):
        return budget_allowance(self.args.time_budget, self.args.allowance)

    def phase(self):
        i = phase_index([r["status"] for r in self.rows], len(self.phases), self.args.phase_every,
                        self.args.phase_plateau)
        return self.phases[i]

    def done(self):
        """Model experiments that ran to a verdict (interrupted ones don't count against --max-experiments)."""
        return sum(r["status"] not in ("baseline", "interrupted") for r in self.rows)

    def next_exp(self):
        return max([int(r["experiment"]) for r in self.rows], default=-1) + 1

    def outcome(self, exp, **fields):
        """A new experiment's Outcome, by this loop's agent. Every experiment is a round of its own (the baseline's
        is 0), on worker 0."""
        fields.setdefault("round", max((r["round"] for r in self.rows), default=0) + 1)
        return Outcome(exp, agent=self.agent.name, time_budget=self.args.time_budget, **fields)

    def record(self, o):
        row = make_row(o, self.rows, self.metric, time.time())
        append_row(row, self.metric)
        self.rows.append(row)

    def conclude(self, o):
        """The one ending of every experiment: a keep amends its candidate into the keep commit, anything else goes
        back to where it started (the scratchpad notes survive), and its row is recorded. The row comes after the
        keep commit and before the revert, so that a kill -9 anywhere leaves what --resume recovers it from."""
        if o.status == "keep":
            self.commit_keep(o)
        scratch = read_scratchpad()
        self.record(o)
        if o.status != "keep" and o.base:
            self.restore(o.base, scratch)
        self.cleanup_runs()
        say("autoresearch: " + decision_line(self.rows[-1], self.metric))

    # --- branch set-up and resume reconciliation ----------------------------------------------------
    def setup(self):
        os.makedirs("runs", exist_ok=True)
        stop_orphan()
        exists = git("rev-parse", "--verify", "-q", f"refs/heads/{self.branch}", check=False) != ""
        if not self.args.resume:
            if exists:
                raise HarnessError(f"branch {self.branch} already exists: pass --resume, or a new --tag")
            if load_results():
                raise HarnessError(f"{RESULTS} holds results of an earlier run: pass --resume --tag TAG, "
                                   f"or move it away (mv {RESULTS} results-old.tsv)")
            sweep_worktrees()
            git("checkout", "-q", "-b", self.branch)
            return
        if not exists:
            raise HarnessError(f"nothing to resume: branch {self.branch} does not exist (check --tag)")
        self.rows = [typed_row(r, self.metric) for r in load_results(metric=self.metric)]
        upgrade_results(self.metric)
        scratch = read_scratchpad()
        git("checkout", "-q", "-f", self.branch)
        head = git("rev-parse", "HEAD")
        _, target, _, _ = state_from_rows(self.rows)
        round_start = None   # the notes a recovered round started from
        if target and head != target:
            tr = parse_trailers(git("log", "-1", "--format=%B", head))
            exp = tr.get("Experiment", "")
            if exp.isdigit() and int(exp) not in {r["experiment"] for r in self.rows}:
                where = {k.lower(): int(tr[k]) for k in ("Round", "Worker") if tr.get(k, "").isdigit()}
                o = self.outcome(int(exp), commit=head, description=tr.get("Hypothesis", ""), phase=tr.get("Phase", ""),
                                 **where)
                if tr.get("Status") == "keep":
                    # killed after the keep commit, before its row (in the second seed's run, or just after it): the
                    # commit carries the result, decided on its first run
                    o.values, o.delta, o.threshold = runs_of({"runs": tr.get("Runs")}), num(tr.get("Delta")), \
                        num(tr.get("Threshold"))
                    o.status, o.reason = "keep", f"recovered from the keep commit on resume ({len(o.values)} run(s))"
                    self.record(o)
                    round_start = git("show", f"{target}:{SCRATCHPAD}", check=False)
                    target = head
                elif tr.get("Status") == "candidate":
                    o.base, o.reason = target, "killed during the run; recovered on resume"
                    self.record(o)
        notes = self.recover_workers(target)
        git("reset", "-q", "--hard", target or "HEAD")   # drop half-done edits; the notes are restored below
        if scratch is not None:
            self.save_notes(scratch, "notes recovered on resume")
        if notes:   # onto the notes the round started from: a recovered winner's own are in its keep commit
            base = read_scratchpad() if round_start is None else round_start
            self.save_notes(merge_scratchpads(base or "", notes), "notes of workers recovered on resume")
        sweep_worktrees()
        self.cleanup_runs()    # hand-offs of runs that were cut short
        say(f"autoresearch: resuming {self.branch} with {len(self.rows)} recorded experiments")

    def recover_workers(self, base):
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
            if cand and int(exp) not in {r["experiment"] for r in self.rows}:
                o = self.outcome(int(exp), commit=head, description=tr.get("Hypothesis", ""), phase=tr.get("Phase", ""),
                                 base=base, round=int(tr.get("Round", 0)), worker=int(tr.get("Worker", 0)),
                                 reason="killed during the run; recovered on resume")
                self.record(o)
            if os.path.exists(os.path.join(path, SCRATCHPAD)):
                notes[exp if cand else f"? (worker {d[1:]}, stopped before its run)"] = read_text(
                    os.path.join(path, SCRATCHPAD))
        return notes

    def save_notes(self, scratch, why):
        """scratchpad.md survives reverts: write it back and commit it on its own."""
        if scratch is None or not os.path.exists(SCRATCHPAD) or read_text(SCRATCHPAD) == scratch:
            return
        write_text(SCRATCHPAD, scratch)
        git("add", SCRATCHPAD)
        git("commit", "-q", "--no-verify", "-m", f"scratchpad: {why}")

    def restore(self, base, scratch):
        git("reset", "-q", "--hard", base)
        self.save_notes(scratch, "notes kept across a revert")

    def cleanup_runs(self):
        """Hand-offs are kept for the baseline and the best (report --test), and a baseline's that --resume continues."""
        _, _, best_exp, base_exp = state_from_rows(self.rows)
        pending = pending_baseline(self.rows)
        keep = {f"runs/{best_exp}", f"runs/{base_exp}", f"runs/{pending and pending['experiment']}"}
        if os.path.isdir("runs"):
            for d in os.listdir("runs"):
                if f"runs/{d}" not in keep and re.fullmatch(r"\d+(-s\d+)?", d):
                    shutil.rmtree(f"runs/{d}", ignore_errors=True)

    def prestart(self, label, cwd=".", slot=None):
        """A candidate's run, started when its conversation opens (start_run(wait=True)); not under SLURM, where a
        job would hold its node while the model thinks."""
        if not on_slurm(self.args):
            return start_run(self.args, label, f"runs/{label}", 1, self.allowance(), cwd, slot or self.alone, wait=True)

    def run(self, label, seed, phase_short, allowance=None, started=None):
        """One run alone on the machine (the baseline's, a candidate's, a second seed)."""
        run = run_sandbox(self.args, label, f"runs/{label}", seed, phase_short, self.metric, allowance,
                          slot=self.alone, started=started)
        self.last_log = run.log
        return run

    # --- experiments ---------------------------------------------------------------------------------
    def baseline(self):
        """train.py as it is, --noise-runs times with seeds 1..K: the first best and the noise. However it stops (a failed
        seed, Ctrl-C), the seeds that finished are recorded (an interrupted row of round 0), and --resume runs only
        the missing ones, as long as the commit is the same."""
        a, head = self.args, git("rev-parse", "HEAD")
        o = self.outcome(self.next_exp(), round=0, description="baseline", phase=self.phases[0], commit=head,
                         started=time.time())
        prior = pending_baseline(self.rows)
        if prior and prior["commit"] == head:
            o.values, o.train_wall_seconds = list(prior["runs"]), prior["train_wall_seconds"]
            if os.path.isdir(f"runs/{prior['experiment']}"):   # seed 1's hand-off, for report --test
                os.replace(f"runs/{prior['experiment']}", f"runs/{o.experiment}")
        say(f"autoresearch: experiment {o.experiment}: baseline ({a.noise_runs} runs to measure the noise" +
            (f"; {len(o.values)} recorded by experiment {prior['experiment']})" if o.values else ")"))
        try:
            for k in range(len(o.values), a.noise_runs):
                run = self.run(str(o.experiment) if k == 0 else f"{o.experiment}-s{k + 1}", k + 1, "baseline")
                o.run_seconds += run.seconds
                if run.status != "ok":
                    raise HarnessError(baseline_failure(run, k + 1, o.values, o.train_wall_seconds, a.time_budget,
                                                        run_grace(None)) + f" Then continue: python autoresearch.py "
                                       f"--resume --tag {a.tag}\n{run.tail[-2000:]}")
                o.values.append(run.value)
                o.train_wall_seconds = max(o.train_wall_seconds or 0.0, run.metrics.get("train_wall_seconds", 0.0))
        except (KeyboardInterrupt, HarnessError) as e:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not break the clean-up
            o.reason = f"{len(o.values)} of {a.noise_runs} seeds, then " + (
                str(e).split("\n")[0] if isinstance(e, HarnessError) else "Ctrl-C / SIGTERM")
            self.conclude(o)
            raise
        o.status, o.delta, o.reason = "baseline", 0.0, f"{len(o.values)} seeds"
        self.conclude(o)
        over = o.train_wall_seconds - a.time_budget
        if over > self.allowance():
            say(f"autoresearch: WARNING: the baseline's training container ran {over:.0f}s past the {a.time_budget}s "
                f"budget (start-up, data loading, export), more than the {self.allowance():.0f}s a candidate may "
                f"(max({ALLOWANCE_SHARE:.0%} of the budget, {ALLOWANCE_MIN:g}s)): candidates like it will be recorded "
                f"invalid: a busy machine, or a start-up to shorten; or allow more with --allowance {math.ceil(over * 1.5)}")

    def experiment(self):
        a = self.args
        phase = self.phase()
        o = self.outcome(self.next_exp(), phase=phase, base=git("rev-parse", "HEAD"), started=time.time())
        short = phase.split(":")[0]
        base_src = read_text(TRAIN)   # identical to HEAD: the tree is clean here
        best, sigma = self.best, self.sigma()
        run = None
        say(f"autoresearch: experiment {o.experiment} ({phase}); best {fmt(best)}")
        label = str(o.experiment)
        started = self.prestart(label)
        try:
            conv = self.agent.open(base_src, self.rows, self.best_line(best, sigma), phase, self.last_log)
            verdict, info = self.agent.propose(conv, o, ".", base_src, self.rows, self.last_log)
            o.description = info if verdict == "run" else ""
            fixes = 0
            while verdict == "run":
                git("reset", "-q", "--soft", o.base)     # one candidate commit on top of best, even after fixes
                git("add", TRAIN, SCRATCHPAD)
                git("commit", "-q", "--no-verify", "--allow-empty", "-m",
                    commit_message(o.experiment, o.description, phase, "candidate", self.metric))
                o.commit = git("rev-parse", "HEAD")
                run = self.run(label, 1, short, self.allowance(), started)
                started = None
                o.run_seconds += run.seconds
                if run.status != "crash" or fixes >= a.fix_attempts:
                    break
                fixes += 1
                say(f"autoresearch: experiment {o.experiment} crashed ({run.reason}); fix attempt "
                    f"{fixes}/{a.fix_attempts}")
                self.agent.crashed(conv, run)
                verdict, info = self.agent.propose(conv, o, ".", read_text(TRAIN), self.rows, run.log)
            if run is None:
                o.status, o.description, o.reason = "invalid", "(no valid run)", info
            elif run.status != "ok":
                o.status, o.reason = run.status, run.reason
            else:
                o.values, o.train_wall_seconds = [run.value], run.metrics.get("train_wall_seconds")
                o.status, o.delta, o.threshold, o.reason = decide(o.values, best, sigma, a.z, a.floor, a.confirm,
                                                                  self.metric)
                self.second_seed(o, best, sigma, a.z, short)
        except (KeyboardInterrupt, HarnessError) as e:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not break the clean-up
            if o.status != "keep":   # a keep in its second seed's run stays a keep (second_seed)
                o.status, o.reason = "interrupted", str(e) or "Ctrl-C / SIGTERM"
            self.conclude(o)
            raise
        finally:
            cancel_run(label, started)   # no run_experiment: its run never got its go
        self.conclude(o)

    def second_seed(self, o, best, sigma, z, short):
        """The candidate at HEAD, decided on its first run. A keep is decided there: the second seed only refines
        best and sigma (repeated to re-estimate sigma and de-bias best), so the keep is committed before that run,
        and Ctrl-C or kill -9 during it keeps the gain (on one run) instead of losing it. A confirm needs a second
        seed that agrees."""
        a = self.args
        pending_keep = o.status == "keep" and a.noise_runs >= 2
        if pending_keep:
            self.commit_keep(o)
        elif o.status != "confirm":
            return
        try:
            rep = self.run(f"{o.experiment}-s2", 2, short, self.allowance())
        except (KeyboardInterrupt, HarnessError):
            if pending_keep:
                o.reason += ", second seed interrupted"
            raise
        o.run_seconds += rep.seconds
        if rep.status == "ok":
            o.values.append(rep.value)
            if o.status == "confirm":
                o.status, o.delta, o.threshold, o.reason = decide(o.values, best, sigma, z, a.floor, a.confirm,
                                                                  self.metric)
        elif o.status == "confirm":
            o.status, o.reason = "discard", o.reason + f", confirm run failed ({rep.status})"

    # --- rounds (--workers N) ------------------------------------------------------------------------
    def round(self, n):
        """n candidates from the same best commit: worker k proposes in its own worktree (a fresh conversation that
        lists what the round's earlier workers proposed) and trains in its own slot, in a thread, while the model
        already talks to worker k+1. At the end, decide_round against the round's starting best with the z for the
        best of n (sidak_z): at most one is kept (second seed as in experiment()), the others that pass are
        discarded as beaten, and every worker's notes reach scratchpad.md (merge_scratchpads)."""
        a, phase = self.args, self.phase()
        short, base, base_src, start_notes = phase.split(":")[0], git("rev-parse", "HEAD"), read_text(TRAIN), \
            read_scratchpad() or ""
        best, sigma, z = self.best, self.sigma(), sidak_z(a.z, n)
        rnd, first = max(r["round"] for r in self.rows) + 1, self.next_exp()
        cancel, workers, settling = threading.Event(), [], None
        say(f"autoresearch: round {rnd}: experiments {first}-{first + n - 1} ({phase}); best {fmt(best)}; "
            f"z {z:.3g} for the best of {n}")
        try:
            for k in range(n):
                w = Worker(k, worktree(k, base), self.slots[k], self.outcome(
                    first + k, round=rnd, worker=k, phase=phase, base=base, started=time.time()))
                workers.append(w)
                label = str(w.o.experiment)
                w.started = self.prestart(label, w.path, w.slot)
                others = [x.o.description for x in workers if x.o.description]
                w.messages = self.agent.open(base_src, self.rows, self.best_line(best, sigma, z), phase, self.last_log,
                                             others)
                self.propose(w, base_src, cancel)
            queue = [w for w in workers if w.thread]
            while queue:   # in worker order, so that the model's fix conversations come in a fixed order
                w = queue.pop(0)
                w.thread.join()
                if w.error:
                    raise w.error
                self.last_log = w.run.log
                if w.run.status == "crash" and w.fixes < a.fix_attempts:
                    w.fixes += 1
                    say(f"autoresearch: experiment {w.o.experiment} crashed ({w.run.reason}); fix attempt "
                        f"{w.fixes}/{a.fix_attempts}")
                    self.agent.crashed(w.messages, w.run)
                    self.propose(w, read_text(os.path.join(w.path, TRAIN)), cancel)
                    queue += [w] if w.thread else []
            ok = {w.o.experiment: w.run.value for w in workers if w.run and w.run.status == "ok"}
            winner, verdicts = decide_round(best, sigma, ok, z, a.floor, a.confirm, self.metric)
            for w in workers:
                o, run = w.o, w.run
                if run and run.status != "ok":
                    o.status, o.reason = run.status, run.reason
                elif run:
                    o.values, o.train_wall_seconds = [run.value], run.metrics.get("train_wall_seconds")
                    o.status, o.delta, o.threshold, o.reason = verdicts[o.experiment]
            notes = self.round_notes(start_notes, workers)
            for w in workers:
                if w.o.experiment != winner:
                    self.conclude(w.o)   # this checkout is still on the round's base: only the row
                    w.concluded = True
            if winner is not None:
                w = workers[winner - first]
                git("reset", "-q", "--hard", w.o.commit)   # the winner's candidate at HEAD, as in experiment(); a
                settling = w                               # kill -9 from here on: recover_workers has the notes
                self.second_seed(w.o, best, sigma, z, short)
                self.conclude(w.o)
                w.concluded = True
            self.save_notes(notes, f"notes of round {rnd}")
        except (KeyboardInterrupt, HarnessError) as e:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not break the clean-up
            cancel.set()                                    # every run in flight stops, recorded interrupted
            for w in workers:
                if w.thread:
                    w.thread.join()
            notes = self.round_notes(start_notes, workers)
            for w in workers:
                cancel_run(str(w.o.experiment), w.started)
                if not w.concluded:
                    if w is not settling or w.o.status != "keep":   # a keep in its second seed stays a keep
                        w.o.status, w.o.reason = "interrupted", str(e) or "Ctrl-C / SIGTERM"
                    self.conclude(w.o)
            self.save_notes(notes, f"notes of round {rnd}")
            raise

    def propose(self, w, base_src, cancel):
        """Worker w's turn with the model (the tools act on its worktree); a run_experiment commits its candidate
        there and starts its run in a thread."""
        verdict, info = self.agent.propose(w.messages, w.o, w.path, base_src, self.rows, self.last_log)
        if verdict != "run":
            if w.run is None:
                w.o.status, w.o.description, w.o.reason = "invalid", "(no valid run)", info
            cancel_run(str(w.o.experiment), w.started)
            w.thread, w.started = None, None
            return
        w.o.description = info
        git("reset", "-q", "--soft", w.o.base, cwd=w.path)   # one candidate commit on top of best, even after fixes
        git("add", TRAIN, SCRATCHPAD, cwd=w.path)
        git("commit", "-q", "--no-verify", "--allow-empty", "-m", commit_message(
            w.o.experiment, w.o.description, w.o.phase, "candidate", self.metric,
            extra={"Round": w.o.round, "Worker": w.o.worker}), cwd=w.path)
        w.o.commit = git("rev-parse", "HEAD", cwd=w.path)
        label, allowance, started, w.started = str(w.o.experiment), self.allowance(), w.started, None

        def train():
            try:
                w.run = run_sandbox(self.args, label, f"runs/{label}", 1, w.o.phase.split(":")[0], self.metric,
                                    allowance, w.path, w.slot, cancel, started)
                w.o.run_seconds += w.run.seconds
            except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which raises it
                w.error = e
        w.thread = threading.Thread(target=train, name=f"worker-{w.index}", daemon=True)
        w.thread.start()

    def round_notes(self, notes, workers):
        """The round's scratchpad: its notes at the start, and every worker's new notes under its experiment."""
        return merge_scratchpads(notes, {w.o.experiment: read_text(os.path.join(w.path, SCRATCHPAD))
                                         for w in workers if os.path.exists(os.path.join(w.path, SCRATCHPAD))})

    def commit_keep(self, o):
        """Amend the candidate into the keep commit; its trailers let --resume record a keep whose row never got
        written."""
        trailers = {"Runs": cell(o.values), "Best": cell(sum(o.values) / len(o.values)), "Threshold": cell(o.threshold),
                    "Round": o.round, "Worker": o.worker}
        git("commit", "-q", "--no-verify", "--amend", "-m", commit_message(
            o.experiment, o.description, o.phase, "keep", self.metric, o.values[0], o.delta, trailers))
        o.commit = git("rev-parse", "HEAD")

    def best_line(self, best, sigma, z=None):
        """What the model is told about the best and the keep rule."""
        return f"{self.metric.column} {fmt(best)} (noise sigma {fmt(sigma) or 'unknown'}; a change must beat it " \
               f"by more than max({self.args.z if z is None else round(z, 3)}*sigma, {self.args.floor:.0%}))"

    def main(self):
        self.setup()
        try:
            if not any(r["status"] == "baseline" for r in self.rows):
                self.baseline()
                write_report(self.rows, self.metric, quiet=True)
            while not self.args.max_experiments or self.done() < self.args.max_experiments:
                left = self.args.max_experiments - self.done() if self.args.max_experiments else self.args.workers
                n = min(self.args.workers, left)
                self.round(n) if n > 1 else self.experiment()
                write_report(self.rows, self.metric, quiet=True)
        except KeyboardInterrupt:
            if self.rows:
                write_report(self.rows, self.metric, quiet=True)
            raise
        finally:
            if self.args.workers > 1:
                sweep_worktrees()
        write_report(self.rows, self.metric)
        summary(self.rows, self.metric)
        report_test(self.rows, self.metric, self.args)
