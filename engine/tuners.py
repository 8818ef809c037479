"""The tuner agents (--agent optuna|random): a search space of train.py's constants, and their proposals."""
import ast
import math
import os
import random
import re
import time
from dataclasses import dataclass

from engine.repo import git
from engine.results import load_results, runs_of
from engine.util import HarnessError, PROGRAM, RESULTS, TRAIN, num, read_text, write_text
from engine.verdicts import Status


FRACTIONS = ("_FRAC", "_PROB")    # constants named so are fractions or probabilities: searched within [0, 1]


SPACE_LINE = re.compile(r"([A-Z][A-Z0-9_]*)\s*:\s*(\S+)\s+(\S+)\s+(\S+)")


SPACE_FORMAT = "NAME: log|float|int LOW HIGH, e.g. `LEARNING_RATE: log 1e-4 4e-3`"


@dataclass(frozen=True)
class Param:
    """One searched constant: `log` (log-uniform float), `float` (uniform) or `int` (uniform integer) in [low, high]."""
    name: str
    kind: str
    low: float
    high: float

    def snap(self, v):
        """The value as written into train.py: 4 significant digits (or an integer), inside the range."""
        v = round(v) if self.kind == "int" else float(f"{v:.4g}")
        return min(max(v, self.low), self.high)

    def literal(self, v):
        if self.kind == "int":
            return str(int(v))
        s = f"{v:.4g}"
        return s if any(c in s for c in ".en") else s + ".0"   # stays a float literal (100.0, not 100)


def _number(node, depth=0):
    """Pure. The value of literals combined with + - * / (e.g. 1 / 0.07), else None (calls, names, bools, text,
    and expressions nested deeper than any constant needs: a model-written 1+1+...+1 must not exhaust the stack)."""
    if depth > 20:
        return None
    if isinstance(node, ast.Constant):
        return node.value if type(node.value) in (int, float) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _number(node.operand, depth + 1)
        return None if v is None else -v if isinstance(node.op, ast.USub) else v
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}   # no ** : 10 ** 10 ** 10 would hang the harness
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        a, b = _number(node.left, depth + 1), _number(node.right, depth + 1)
        if a is not None and b is not None and not (isinstance(node.op, ast.Div) and b == 0):
            return ops[type(node.op)](a, b)
    return None


def _device_branch(stmt, device):
    """Pure. For `if DEVICE == "x":` / `!=` the statements that run on `device`, else None (not a preset block)."""
    t = stmt.test if isinstance(stmt, ast.If) else None
    if not (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "DEVICE"
            and len(t.ops) == 1 and isinstance(t.ops[0], (ast.Eq, ast.NotEq))
            and isinstance(t.comparators[0], ast.Constant) and isinstance(t.comparators[0].value, str)):
        return None
    runs = (device == t.comparators[0].value) == isinstance(t.ops[0], ast.Eq)
    return stmt.body if runs else stmt.orelse


def hyperparameters(train_src, cuda):
    """Pure. {NAME: ast.Assign} of the numeric UPPER_CASE constants of train.py's active preset.

    The hyperparameter section is the module level up to and including the `if DEVICE == "cuda": ... else: ...`
    preset block (all of it without one); of that block only the branch that runs counts: the cuda one iff
    cuda (torch.cuda.is_available(), the test train.py makes). Values must be numbers or arithmetic on
    numbers: TIME_BUDGET = float(os.environ...), booleans, strings and dicts are not searched. The last
    assignment of a name wins, as when the module runs."""
    device = "cuda" if cuda else "cpu"
    found = {}

    def collect(stmts):
        for s in stmts:
            branch = _device_branch(s, device)
            if branch is not None:
                collect(branch)
            elif (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
                  and re.fullmatch(r"[A-Z][A-Z0-9_]*", s.targets[0].id) and _number(s.value) is not None):
                found[s.targets[0].id] = s

    for stmt in ast.parse(train_src).body:
        collect([stmt])
        if _device_branch(stmt, device) is not None:
            break
    return found


def derived_space(consts):
    """Pure. The default space around the current values: floats log-uniform from x1/4 to x4, ints uniform from
    x1/2 to x2, fractions and probabilities (names ending in _FRAC or _PROB) log-uniform clipped to [0, 1].
    Zero and negative constants have no scale to multiply and are left out (list them in program.md)."""
    space = []
    for name, node in consts.items():
        v = _number(node.value)
        if v <= 0:
            continue
        if isinstance(v, int) and not name.endswith(FRACTIONS):
            p = Param(name, "int", math.ceil(v / 2), 2 * v)
        else:
            hi = min(4 * v, 1.0) if name.endswith(FRACTIONS) else 4 * v
            p = Param(name, "log", float(f"{v / 4:.4g}"), float(f"{hi:.4g}"))
        if p.low < p.high:
            space.append(p)
    return space


def parse_space_line(line, consts, preset):
    """Pure. One line of the ## Search space block as a Param; a ValueError says what is wrong with it."""
    m = SPACE_LINE.fullmatch(line)
    if not m:
        raise ValueError("not a search-space line")
    name, kind, lo, hi = m.groups()
    if kind not in ("log", "float", "int"):
        raise ValueError(f"unknown kind {kind!r} (log, float or int)")
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        raise ValueError("LOW and HIGH must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError("LOW must be a finite number below HIGH")
    if kind == "log" and low <= 0:
        raise ValueError("a log range needs LOW > 0")
    if kind == "int":
        if low != int(low) or high != int(high):
            raise ValueError("int bounds must be whole numbers")
        low, high = int(low), int(high)
    if name not in consts:
        raise ValueError(f"{name} is not a numeric constant of train.py's {preset} preset (those are: "
                         f"{', '.join(consts) or 'none'})")
    return Param(name, kind, low, high)


def parse_search_space(program_text, consts, preset="active"):
    """Pure. The `## Search space` block of program.md as [Param], or None without one.

    One constant per line, `NAME: log|float|int LOW HIGH`; blank lines, ``` fences, list dashes and backticks
    around a line are ignored; the next `#` heading ends the block. Bad input: one HarnessError naming the line."""
    lines = program_text.split("\n")
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"##\s*search space\s*", line.strip(), re.I)]
    if len(starts) > 1:
        raise HarnessError(f"{PROGRAM} has {len(starts)} ## Search space blocks (lines "
                           f"{', '.join(str(i + 1) for i in starts)}): keep one")
    if not starts:
        return None
    space = []
    for i in range(starts[0] + 1, len(lines)):
        raw = lines[i].strip()
        if raw.startswith("#"):
            break
        line = raw.lstrip("-* ").strip("`").strip()
        if not line or raw.startswith("```"):
            continue
        try:
            p = parse_space_line(line, consts, preset)
            if any(q.name == p.name for q in space):
                raise ValueError(f"{p.name} is listed twice")
        except ValueError as e:
            raise HarnessError(f"{PROGRAM} line {i + 1} ({raw!r}) in ## Search space: {e}; "
                               f"expected {SPACE_FORMAT}") from None
        space.append(p)
    if not space:
        raise HarnessError(f"{PROGRAM}'s ## Search space block lists no constants; expected lines like {SPACE_FORMAT}")
    return space


def search_space(train_src, program_text, cuda):
    """Pure. program.md's `## Search space` block if it has one, else the space derived from train.py."""
    try:
        consts = hyperparameters(train_src, cuda)
    except SyntaxError as e:
        raise HarnessError(f"train.py does not parse ({e.msg}, line {e.lineno}): fix it before tuning") from None
    space = parse_search_space(program_text, consts, "cuda" if cuda else "cpu")
    space = derived_space(consts) if space is None else space
    if not space:
        raise HarnessError("train.py has no numeric UPPER_CASE constants to search: add a ## Search space block "
                           f"to {PROGRAM} ({SPACE_FORMAT})")
    if sum(len(p.name) + 12 for p in space) > 480:    # the description cell of results.tsv holds the trial
        raise HarnessError(f"the search space ({len(space)} constants) is too large to record each trial in "
                           f"{RESULTS}: list the constants to search in a ## Search space block of {PROGRAM}")
    return space


def apply_params(train_src, literals, cuda):
    """Pure. train.py with the value of each constant in {NAME: source text} replaced in the active preset,
    nothing else touched."""
    consts = hyperparameters(train_src, cuda)
    missing = [n for n in literals if n not in consts]
    if missing:
        raise HarnessError(f"train.py no longer has the searched constant(s) {', '.join(missing)} in its "
                           f"active preset")
    src = train_src.encode("utf-8")            # ast offsets count bytes
    starts = [0] + [i + 1 for i, b in enumerate(src) if b == ord("\n")]
    edits = []
    for name, text in literals.items():
        v = consts[name].value
        edits.append((starts[v.lineno - 1] + v.col_offset, starts[v.end_lineno - 1] + v.end_col_offset, text))
    for a, b, text in sorted(edits, reverse=True):
        src = src[:a] + text.encode("utf-8") + src[b:]
    return src.decode("utf-8")


def format_params(space, params):
    """Pure. A trial as results.tsv's description, `NAME=value ...`, in the space's order."""
    return " ".join(f"{p.name}={p.literal(params[p.name])}" for p in space)


def parse_params(description, space):
    """Pure. The trial written by format_params, or None if the description is not one of this space."""
    pairs = dict(tok.split("=", 1) for tok in description.split() if "=" in tok)
    if sorted(pairs) != sorted(p.name for p in space):
        return None
    try:
        return {p.name: p.snap(float(pairs[p.name])) for p in space}
    except ValueError:
        return None


def random_params(space, seed, k):
    """Pure. The k-th trial of the random agent: uniform (log-uniform for `log`), reproducible from (seed, k)."""
    rng = random.Random(f"{seed}:{k}")
    out = {}
    for p in space:
        if p.kind == "int":
            v = rng.randint(p.low, p.high)
        elif p.kind == "log":
            v = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
        else:
            v = rng.uniform(p.low, p.high)
        out[p.name] = p.snap(v)
    return out


def tuner_trials(rows, agent, space, metric):
    """Pure. (done, pending) of one tuner from results rows (the rows it proposed: its name as their proposer, or as
    their agent in rows of a harness before proposers). done: [(params, value)] in order, value None for a crash or
    timeout (a failed trial), else the mean of the trial's seeded runs. pending: trials that were interrupted and not
    run to a verdict since; they run again first, so no trial is lost or repeated."""
    col = metric.column
    done, pending = [], []
    for r in rows:
        if (r.get("proposer") or r.get("agent")) != agent or r["status"] == "baseline":
            continue
        params = parse_params(r["description"], space)
        if r["status"] == "interrupted":
            if params is not None and params not in pending:   # None: stopped before a trial was proposed
                pending.append(params)
            continue
        if params is None:
            raise HarnessError(f"experiment {r['experiment']} in {RESULTS} is not a trial of this search space "
                               f"({r['description'][:80]!r}): resume with the {PROGRAM} and train.py it started with")
        if params in pending:
            pending.remove(params)
        runs = runs_of(r)
        value = None if r["status"] in (Status.CRASH, Status.TIMEOUT, Status.INVALID) else (
            sum(runs) / len(runs) if runs else num(r[col]))
        done.append((params, value))
    return done, pending


class RandomSampler:
    def __init__(self, space, seed):
        self.space, self.seed = space, seed

    def propose(self, done):
        return random_params(self.space, self.seed, len(done))


class OptunaSampler:
    """TPE through Optuna, in the metric's direction. Each proposal comes from a fresh study that holds every result
    so far, with the seed advanced by their count: the trial is a function of (seed, history), so a resumed run
    proposes what the uninterrupted one would have."""
    def __init__(self, space, seed, metric):
        try:
            import optuna
        except ImportError:
            raise HarnessError("--agent optuna needs Optuna: pip install optuna") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.space, self.seed, self.direction = optuna, space, seed, metric.direction
        D = optuna.distributions
        self.dists = {p.name: D.IntDistribution(p.low, p.high) if p.kind == "int"
                      else D.FloatDistribution(p.low, p.high, log=p.kind == "log") for p in space}

    def study(self, done):
        optuna = self.optuna
        study = optuna.create_study(direction=self.direction,
                                    sampler=optuna.samplers.TPESampler(seed=self.seed + len(done)))
        for params, value in done:
            state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
            study.add_trial(optuna.trial.create_trial(params=params, distributions=self.dists, value=value,
                                                      state=state))
        return study

    def propose(self, done):
        trial = self.study(done).ask(self.dists)
        return {p.name: p.snap(trial.params[p.name]) for p in self.space}


class Tuner:
    """A tuner agent: the search space of the run's baseline, and the sampler that proposes its trials."""
    def __init__(self, agent, train_src, program_text, cuda, seed, metric):
        self.name, self.cuda, self.metric = agent, cuda, metric
        self.space = search_space(train_src, program_text, cuda)
        self.sampler = OptunaSampler(self.space, seed, metric) if agent == "optuna" else RandomSampler(self.space, seed)

    def open(self, *context, others=()):
        return None   # no conversation

    def history(self, rows):
        return tuner_trials(rows, self.name, self.space, self.metric)

    def propose(self, conv, o, root, base_src, rows, log):
        """The next trial (an interrupted one first), written into root's train.py: ('run', its description)."""
        t0 = time.time()
        done, pending = self.history(rows)
        params = pending[0] if pending else self.sampler.propose(done)
        text = {p.name: p.literal(params[p.name]) for p in self.space}
        write_text(os.path.join(root, TRAIN), apply_params(read_text(os.path.join(root, TRAIN)), text, self.cuda))
        o.model_seconds += time.time() - t0
        return "run", format_params(self.space, params)


def make_tuner(args, metric, name=None):
    """The tuner of --agent optuna|random (or `name`) over the search space of the run's baseline commit (a resumed
    run keeps its space). The active preset is the one train.py picks: cuda iff torch sees a GPU."""
    base = next((r["commit"] for r in load_results() if r["status"] == Status.BASELINE), None) if args.resume else None
    if base:
        train_src, program = git("show", f"{base}:{TRAIN}"), git("show", f"{base}:{PROGRAM}")
    else:
        train_src, program = read_text(TRAIN), read_text(PROGRAM)
    import torch
    return Tuner(name or args.agent, train_src, program, torch.cuda.is_available(), args.tuner_seed, metric)
