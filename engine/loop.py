"""The research loop: a baseline, then rounds of experiments (one, or one per worker), each kept or reverted.

An experiment's life, the same for one worker and for N (Loop.round):
  1. propose: the agent (agent.LLMAgent or a tuners.Tuner) edits train.py in the worker's worktree, which becomes one
     candidate commit; its run, started when the proposal began (./run.sh --wait), gets its go and trains. A crash goes
     back to the LLM, which may fix it (--fix-attempts).
  2. judge: the keep rule (judge.next_step) asks for more runs of the candidate, or of the incumbent, until it says
     keep or discard. Of a round's kept candidates the best is kept (judge.round_winner), the others are beaten.
  3. conclude: the winner becomes the keep commit on the branch and runs once more (the honest estimate of the kept
     code); everything else is reverted (the notes survive); every experiment is one row of results.tsv.
The main checkout holds the best commit throughout: the incumbent's re-measures run there, the candidates in
.worktrees/w<k>. Ctrl-C, SIGTERM or an error stops every run in flight (recorded interrupted); kill -9: --resume.
"""
import os
import signal
import threading
import time
from dataclasses import dataclass

from engine import branch
from engine.agent import parse_phases, phase_index, read_scratchpad
from engine.judge import (RULES, allowance_warning, baseline_failure, best_line, budget_allowance, decision,
                          incumbent_mean, next_step, pooled_cv, round_winner)
from engine.repo import git, sweep_worktrees, worktree
from engine.report import report_test, summary, write_report
from engine.results import Outcome, append_row, decision_line, incumbent, make_row, noise_groups, pending_baseline
from engine.runs import Run, cancel_run, on_slurm, run_grace, run_sandbox, start_run
from engine.util import HarnessError, PROGRAM, TRAIN, fmt, read_text, say
from engine.verdicts import Status


@dataclass
class Worker:
    """One worker of a round: its worktree and slot, its experiment and conversation, and its run in a thread."""
    index: int
    path: str
    slot: dict
    o: Outcome
    conv: list = None
    fixes: int = 0
    run: Run = None
    started: object = None             # its run, waiting for its go while the agent proposes (start_run)
    thread: threading.Thread = None
    error: BaseException = None
    concluded: bool = False

    def start(self, run, *args, **kw):
        """run(*args, **kw) in a thread of its own: its Run in self.run; an exception is raised by join()."""
        done = threading.Event()

        def target():
            try:
                self.run = run(*args, **kw)
                self.o.run_seconds += self.run.seconds
            except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which raises it
                self.error = e
            finally:
                done.set()
        self.thread = threading.Thread(target=target, name=f"worker-{self.index}", daemon=True)
        self.thread.done = done
        self.thread.start()

    def join(self):
        # An Event, not Thread.join: a Ctrl-C that interrupts Thread.join (CPython < 3.13) marks the thread as
        # stopped while it still runs, and the next join returns at once: the harness would exit mid-clean-up.
        self.thread.done.wait()
        self.thread = None
        if self.error:
            raise self.error


class Loop:
    def __init__(self, args, agent, slots=None, alone=None):
        self.args, self.agent, self.metric = args, agent, agent.metric   # LLMAgent, or a Tuner
        self.rule = RULES[args.rule]
        self.slots, self.alone = slots, alone or {}   # each worker's run environment; a run alone on the machine's
        self.branch = f"autoresearch/{args.tag}"
        self.phases = parse_phases(read_text(PROGRAM))
        self.rows, self.last_log = [], None           # typed rows (make_row): read from results.tsv only on --resume

    # --- state, all of it from the rows ----------------------------------------------------------------
    def noise(self, extra=()):
        """The incumbent's runs (with `extra` re-measures in flight) and the relative noise s (judge.pooled_cv)."""
        return incumbent(self.rows)[0] + list(extra), pooled_cv(noise_groups(self.rows, extra))

    def phase(self):
        i = phase_index([r["status"] for r in self.rows], len(self.phases), self.args.phase_every,
                        self.args.phase_plateau)
        return self.phases[i]

    def done(self):
        """Model experiments that ran to a verdict (interrupted ones don't count against --max-experiments)."""
        return sum(r["status"] not in (Status.BASELINE, Status.INTERRUPTED) for r in self.rows)

    def next_exp(self):
        return max([int(r["experiment"]) for r in self.rows], default=-1) + 1

    def outcome(self, exp, **fields):
        fields.setdefault("round", max((r["round"] for r in self.rows), default=0) + 1)
        return Outcome(exp, agent=self.agent.name, time_budget=self.args.time_budget, **fields)

    def allowance(self):
        return budget_allowance(self.args.time_budget, self.args.allowance)

    def record(self, o):
        self.rows.append(make_row(o, self.rows, self.metric, time.time()))
        append_row(self.rows[-1], self.metric)

    def conclude(self, o):
        """The one ending of every experiment: its row, then, unless kept, the branch back to where it started. The row
        comes first, so that a kill -9 anywhere leaves what --resume recovers it from."""
        self.record(o)
        if o.status != Status.KEEP and o.base:
            git("reset", "-q", "--hard", o.base)
        say("autoresearch: " + decision_line(self.rows[-1], self.metric))

    # --- runs ---------------------------------------------------------------------------------------------
    def run(self, label, seed, cwd=".", slot=None, allowance=None, cancel=None, started=None):
        run = run_sandbox(self.args, label, f"runs/{label}", seed, self.phase().split(":")[0], self.metric, allowance,
                          cwd, slot or self.alone, cancel, started)
        self.last_log = run.log
        return run

    # --- the baseline -------------------------------------------------------------------------------------
    def baseline(self):
        """train.py as it is, --noise-runs times with seeds 1..K: the first best and the noise. However it stops (a
        failed seed, Ctrl-C), the seeds that finished are recorded (an interrupted row of round 0), and --resume runs
        only the missing ones, as long as the commit is the same."""
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
                run = self.run(str(o.experiment) if k == 0 else f"{o.experiment}-s{k + 1}", k + 1)
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
        o.status, o.delta, o.reason = Status.BASELINE, 0.0, f"{len(o.values)} seeds"
        self.conclude(o)
        branch.cleanup_runs(self.rows)
        warning = allowance_warning(o.train_wall_seconds - a.time_budget, self.allowance(), a.time_budget)
        if warning:
            say(f"autoresearch: {warning}")

    # --- a round of experiments ---------------------------------------------------------------------------
    def round(self, n):
        """n experiments from the same best commit, each proposed, run and judged as the module says. Worker k's run
        trains in its slot while the agent proposes for worker k+1; at most one of them is kept."""
        phase, base, start_notes = self.phase(), git("rev-parse", "HEAD"), read_scratchpad() or ""
        base_src, (inc, s) = read_text(TRAIN), self.noise()
        rnd, first = max(r["round"] for r in self.rows) + 1, self.next_exp()
        cancel, workers, winner = threading.Event(), [], None
        what = f"round {rnd}: experiments {first}-{first + n - 1}" if n > 1 else f"experiment {first}"
        say(f"autoresearch: {what} ({phase}); best {fmt(incumbent_mean(inc, s)[0])}")
        try:
            for k in range(n):
                w = Worker(k, worktree(k, base), self.slots[k] if n > 1 else self.alone, self.outcome(
                    first + k, round=rnd, worker=k, phase=phase, base=base, started=time.time()))
                workers.append(w)
                w.started = self.prestart(w)
                w.conv = self.agent.open(base_src, self.rows, best_line(self.metric, self.rule, inc, s), phase, self.last_log,
                                         others=[x.o.description for x in workers if x.o.description])
                self.propose(w, base_src, cancel)
            self.screen(workers, cancel)
            self.judge([w for w in workers if w.run and w.run.status == Status.OK], cancel)
            winner = self.pick(workers)
            for w in sorted(workers, key=lambda w: w is winner):   # the winner last: its keep moves the branch
                if w is winner:
                    self.keep(w)
                self.conclude(w.o)
                w.concluded = True
        except (KeyboardInterrupt, HarnessError) as e:
            self.interrupted(workers, winner, cancel, e)
            raise
        finally:
            branch.save_notes(branch.round_notes(start_notes, workers), f"notes of round {rnd}")
            branch.cleanup_runs(self.rows)

    def interrupted(self, workers, winner, cancel, e):
        """Ctrl-C, SIGTERM or an error in a round: every run in flight stops, and what was not concluded is recorded:
        a decided discard or failure as it was, anything else interrupted (a keep only once its commit is made)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not break the clean-up
        cancel.set()
        for w in workers:
            if w.thread:
                w.thread.done.wait()
            cancel_run(str(w.o.experiment), w.started)
        for w in [w for w in workers if not w.concluded]:
            if w is not winner and w.o.status in (Status.KEEP, Status.INTERRUPTED):
                w.o.status, w.o.reason = Status.INTERRUPTED, str(e) or "Ctrl-C / SIGTERM"
            self.conclude(w.o)

    def prestart(self, w):
        """A candidate's run, started when its proposal begins (./run.sh --wait): its containers load torch while the
        agent works. Not under SLURM, where a job would hold its node while the model thinks."""
        if not on_slurm(self.args):
            label = str(w.o.experiment)
            return start_run(self.args, label, f"runs/{label}", 1, self.allowance(), w.path, w.slot, wait=True)

    def propose(self, w, base_src, cancel):
        """Worker w's turn with the agent, in its worktree; a proposal to run becomes its candidate commit, and its run
        gets its go, in a thread."""
        verdict, info = self.agent.propose(w.conv, w.o, w.path, base_src, self.rows, self.last_log)
        if verdict != "run":
            if w.run is None:
                w.o.status, w.o.description, w.o.reason = Status.INVALID, "(no valid run)", info
            cancel_run(str(w.o.experiment), w.started)
            w.started = None
            return
        w.o.description = w.o.description or info   # a fix attempt keeps the idea it fixes
        branch.commit_candidate(w.o, w.path, self.metric)
        started, w.started = w.started, None
        w.start(self.run, str(w.o.experiment), 1, w.path, w.slot, self.allowance(), cancel, started=started)

    def screen(self, workers, cancel):
        """Each worker's first run, in worker order (so the model's fix conversations come in a fixed order): a crash
        goes back to the LLM while it has fix attempts left."""
        queue = [w for w in workers if w.thread]
        while queue:
            w = queue.pop(0)
            w.join()
            if w.run.status == Status.CRASH and w.conv and w.fixes < self.args.fix_attempts:   # a model to fix it
                w.fixes += 1
                say(f"autoresearch: experiment {w.o.experiment} crashed ({w.run.reason}); fix attempt "
                    f"{w.fixes}/{self.args.fix_attempts}")
                self.agent.crashed(w.conv, w.run)
                self.propose(w, read_text(os.path.join(w.path, TRAIN)), cancel)
                queue += [w] if w.thread else []
            elif w.run.status == "ok":
                w.o.values, w.o.train_wall_seconds = [w.run.value], w.run.metrics.get("train_wall_seconds")
            else:
                w.o.status, w.o.reason = w.run.status, w.run.reason

    def judge(self, going, cancel):
        """The keep rule on each candidate that ran: more runs of it (in its slot, side by side), or of the incumbent
        (in the main checkout, shared by the round), until each is kept or discarded."""
        again, remeasured = [], 0   # the incumbent's re-measures in this round; how many were asked for
        while going:
            inc, s = self.noise(again)
            steps = {id(w): next_step(self.rule, self.metric, inc, w.o.values, s, remeasured) for w in going}
            for w in [w for w in going if steps[id(w)].action in (Status.KEEP, Status.DISCARD)]:
                step = steps[id(w)]
                w.o.status, w.o.t, w.o.reason = step.action, step.stat, step.reason
                w.o.delta, w.o.threshold = decision(self.rule, step, w.o.values, inc, s)
                going.remove(w)
            asking = [w for w in going if steps[id(w)].action == "incumbent"]
            if asking:
                label = f"{asking[0].o.experiment}-i{len(inc) + 1}"
                run = self.run(label, len(inc) + 1, cancel=cancel)
                asking[0].o.run_seconds += run.seconds
                if run.status == "ok":
                    again.append(run.value)
                    asking[0].o.inc_runs.append(run.value)
                remeasured += 1
                continue
            for w in going:
                w.start(self.run, f"{w.o.experiment}-s{len(w.o.values) + 1}", len(w.o.values) + 1, w.path, w.slot,
                               self.allowance(), cancel)
            for w in list(going):
                w.join()
                if w.run.status == "ok":
                    w.o.values.append(w.run.value)
                else:   # a candidate that fails a later run is not one to build on
                    w.o.status, w.o.reason = w.run.status, f"run {len(w.o.values) + 1}: {w.run.reason}"
                    going.remove(w)

    def pick(self, workers):
        """The round's kept candidate with the best mean (judge.round_winner); any other kept one is beaten."""
        kept = {w.index: w.o.values for w in workers if w.o.status == Status.KEEP}
        winner = round_winner(self.metric, kept)
        for w in workers:
            if w.o.status == Status.KEEP and w.index != winner:
                w.o.status = Status.DISCARD
                w.o.reason = f"beaten in round by experiment {workers[winner].o.experiment} ({w.o.reason})"
        return None if winner is None else workers[winner]

    def keep(self, w):
        """The winner as the keep commit on the branch (committed first: an interrupt or kill -9 in what follows keeps
        it), then one more run of it, alone: the honest estimate of the kept code."""
        branch.commit_keep(w.o, self.metric)
        run = self.run(f"{w.o.experiment}-s{len(w.o.values) + 1}", len(w.o.values) + 1, allowance=self.allowance())
        w.o.run_seconds += run.seconds
        w.o.after = [run.value] if run.status == Status.OK else []

    def main(self):
        branch.prepare(self)
        try:
            if not any(r["status"] == Status.BASELINE for r in self.rows):
                self.baseline()
                write_report(self.rows, self.metric, quiet=True)
            while not self.args.max_experiments or self.done() < self.args.max_experiments:
                left = self.args.max_experiments - self.done() if self.args.max_experiments else self.args.workers
                self.round(min(self.args.workers, left))
                write_report(self.rows, self.metric, quiet=True)
        except KeyboardInterrupt:
            if self.rows:
                write_report(self.rows, self.metric, quiet=True)
            raise
        finally:
            sweep_worktrees()
        write_report(self.rows, self.metric)
        summary(self.rows, self.metric)
        report_test(self.rows, self.metric, self.args)
