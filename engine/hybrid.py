"""--agent hybrid: a tuner and the LLM in one search. The tuner (TPE, as --agent optuna) owns the constants of
program.md's search space; the LLM proposes the other trials, the code a tuner cannot write (a loss, the architecture,
a bug), with the tuner's history and best settings in its prompt. Every trial goes through the same keep rule, and
results.tsv's `proposer` says which side proposed it.

Who proposes: the LLM gets LLM_SHARE of the trials to start with (the share of autoresearch-automl's hybrid, which let
a 0.8B model match TPE), more as its keeps outpace the tuner's, fewer as they lag, and its share falls to the floor
while its latest trials fail (no tool call, an invalid edit, a crash): a weak model hands the search to the tuner,
and still gets a trial now and then. After the LLM's code is kept the tuner keeps its history, as a prior: the
constants mean what they meant, only the code around them changed.
"""
from engine.tuners import format_params
from engine.util import fmt, say
from engine.verdicts import Status

LLM_SHARE = 0.3             # the LLM's share of the trials at the start
SHARE_RANGE = (0.1, 0.6)    # ... and how far its record may move it
PRIOR = 4                   # trials' worth of the pooled keep rate in each side's rate
RECENT = 3                  # the LLM's latest trials that decide whether it is failing
FAILED = (Status.INVALID, Status.CRASH, Status.TIMEOUT)


def trials(rows):
    """Pure. The rows of trials that ran to a verdict, by side: {"llm": [...], "tuner": [...]}. Interrupted ones are
    left out, so a resumed run asks the side it asked before."""
    out = {"llm": [], "tuner": []}
    for r in rows:
        if r["status"] not in (Status.BASELINE, Status.INTERRUPTED):
            out["llm" if r.get("proposer") == "llm" else "tuner"].append(r)
    return out


def llm_share(rows):
    """Pure. The LLM's share of the trials from here: LLM_SHARE times the ratio of the two sides' keeps per trial
    (each drawn towards the pooled rate by PRIOR trials, so that a handful of trials moves it little, and equal
    records leave it at LLM_SHARE), times the share of its RECENT latest trials that did not fail, within
    SHARE_RANGE."""
    side = trials(rows)
    keeps = {k: sum(r["status"] == Status.KEEP for r in v) for k, v in side.items()}
    pooled = sum(keeps.values()) / max(1, sum(map(len, side.values())))
    rate = {k: (keeps[k] + PRIOR * pooled) / (len(side[k]) + PRIOR) for k in side}
    ratio = rate["llm"] / rate["tuner"] if pooled else 1.0
    failing = sum(r["status"] in FAILED for r in side["llm"][-RECENT:]) / RECENT
    return min(max(LLM_SHARE * ratio * (1 - failing), SHARE_RANGE[0]), SHARE_RANGE[1])


def next_side(rows, pending):
    """Pure. Who proposes the next trial: the tuner while it has an interrupted trial to run again, else the LLM while
    its trials are fewer than its share of them all (the next one included), else the tuner."""
    if pending:
        return "tuner"
    t = trials(rows)
    return "llm" if len(t["llm"]) < llm_share(rows) * (len(t["llm"]) + len(t["tuner"]) + 1) else "tuner"


def shift_note(rows):
    """Pure. When the LLM's latest trial failed and its share fell with it, the line that says so; else None."""
    llm = trials(rows)["llm"]
    if not llm or llm[-1] is not rows[-1] or llm[-1]["status"] not in FAILED:
        return None
    before, now = llm_share(rows[:-1]), llm_share(rows)
    if now < before:
        return (f"hybrid: the model's trial failed ({llm[-1]['status']}: {llm[-1].get('reason') or 'no reason'}); its "
                f"share of the trials falls from {before:.0%} to {now:.0%}, the tuner proposes the rest")


def tuner_notes(done, space, metric, last=5):
    """Pure. What the LLM is told of the tuner: its best settings and its latest trials ([(params, value)])."""
    ok = [(p, v) for p, v in done if v is not None]
    if not ok:
        return "The tuner (TPE over program.md's ## Search space) has no result yet."
    best = max(ok, key=lambda pv: metric.gain(pv[1], 0.0))
    lines = [f"- {format_params(space, p)}: {fmt(v) if v is not None else 'failed'}" for p, v in done[-last:]]
    return (f"The tuner (TPE over program.md's ## Search space) owns those constants: it has run {len(done)} trials; "
            f"its best, {metric.column} {fmt(best[1])}: {format_params(space, best[0])}. Its latest:\n"
            + "\n".join(lines) + "\nLeave those constants to it: change what it cannot (the code).")


class Hybrid:
    """The agent of --agent hybrid (the interface of agent.LLMAgent and tuners.Tuner: open, propose, crashed)."""
    name = "hybrid"

    def __init__(self, llm, tuner):
        self.llm, self.tuner, self.metric, self.side = llm, tuner, llm.metric, None

    def open(self, train_src, rows, best_line, phase, log, others=()):
        done, pending = self.tuner.history(rows)
        self.side = next_side(rows, pending)
        note = shift_note(rows)
        if note:
            say(f"autoresearch: {note}")
        if self.side == "tuner":
            return None
        notes = tuner_notes(done, self.tuner.space, self.metric)
        return self.llm.open(train_src, rows, best_line + "\n\n" + notes, phase, log, others)

    def propose(self, conv, o, root, base_src, rows, log):
        o.proposer = "llm" if self.side == "llm" else self.tuner.name
        agent = self.llm if self.side == "llm" else self.tuner
        return agent.propose(conv, o, root, base_src, rows, log)

    def crashed(self, conv, run):
        self.llm.crashed(conv, run)

