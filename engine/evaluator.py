"""The trusted evaluation engine of autoresearch: it scores what train.py handed off. A fork keeps this file as is.

    python -m engine.evaluator --evaluate RUN_DIR [--split val|test] [--data DIR|-]   score a hand-off (run.sh runs
                                                                                     this in the evaluation container)
    python -m engine.evaluator --names val|test    the files train.py hands off, then the split's files (for run.sh)

The project, the repository's prepare_data.py, says what to score and how (README: Fork it). It declares four
literals, read here without importing it, and one function:

    METRIC = "accuracy"                                  printed first as val_accuracy (test_... for --split test)
    DIRECTION = "maximize"                               or "minimize"; the harness keeps what improves it
    PROGRAMS = ["image_encoder.pt2", "text_encoder.pt2"] the torch.export archives train.py must hand off
    EVAL_FILES = ["images.npy", "tokens.npy"]            the arrays of DATA/<split>/ that score() reads
    def score(encode, split): ... return {"accuracy": ..., ...}

score() gets split = {"meta": meta.json, "images": array, ...} and encode(program, *inputs) -> float32 [rows, D],
which runs one of PROGRAMS on all rows of the inputs. Everything between the two is this engine's: the hand-off is
refused unless it holds plain files of bounded size and archives of plain tensors and side-effect-free aten graphs
only; the graphs run in an isolated child process, in secret random orders and batches, each row's output must not
depend on the rest of its batch, and only finite float32 arrays of the expected shape come back.

Two processes. The trusted parent never imports torch and never runs anything from the hand-off: it reads the split,
checks every byte of the archives and rebuilds them in memory, and runs score(). The graphs run in a child process
(encoder_child, `python -I`) that gets only the rebuilt archives and the inputs and hands back only float32 arrays;
it never sees the answers, nor the parent's memory or file descriptors (the parent is not dumpable), nor the real
stdout (its own is /dev/null). Exit codes: 0 scored, 1 the hand-off was refused, 2 the project or the data is
broken (not the candidate's fault), 124 the evaluation ran out of time (AUTORESEARCH_EVAL_TIMEOUT).
"""
import argparse
import ast
import contextlib
import importlib.util
import io
import itertools
import json
import math
import numbers
import os
import re
import secrets
import select
import stat
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from engine.archive import Refused, check_archive, check_graphs
from engine.settings import setting

ROOT = Path(__file__).resolve().parent.parent   # the repository (in the evaluation container: /workspace)
PROJECT = ROOT / "prepare_data.py"
STATS = "train_stats.json"  # optional, informational: the numbers below are echoed in the trusted block
STAT_KEYS = ["training_seconds", "num_steps", "peak_memory_mb", "num_params_m"]
MAX_PROGRAM_BYTES, MAX_STATS_BYTES = 2 << 30, 1 << 16
MAX_DIM = 16384            # output size cap: what the child may send back per row
BATCH = 256                # rows per call of a program, at most
# Batch independence: how far a row's output may move when its batch-mates change, relative to its norm. 0 (the
# default): not one bit. Both passes run batches of the same size, so the same kernels, and a row-wise graph gives
# bitwise the same rows (measured on CPU: 0 for the template's encoders and tests/fork's). A tolerance above 0 is for
# hardware where it does not: it lets through a batch-dependent part small beside the row's norm (one huge constant
# column hides any cheat in the others), so keep it 0 wherever runs pass with it.
BATCH_TOLERANCE = float(setting("AUTORESEARCH_BATCH_TOLERANCE"))
NAME = re.compile(r"[a-z][a-z0-9_]*")                  # metric names: the keys of the trusted block
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # hand-off and split files: plain, no spaces, no globs


class SetupError(Exception):
    """The project (prepare_data.py) or the data is broken (exit 2): not the candidate's fault."""


# ----------------------------------------------------------------------------------------------- the project

DECLARATIONS = {  # name: (is it valid, what to write)
    "METRIC": (lambda v: isinstance(v, str) and NAME.fullmatch(v), 'METRIC = "accuracy"  (lowercase, [a-z0-9_])'),
    "DIRECTION": (lambda v: v in ("minimize", "maximize"), 'DIRECTION = "maximize"  (or "minimize")'),
    "PROGRAMS": (lambda v: _names(v, ".pt2") and STATS not in v, 'PROGRAMS = ["model.pt2"]  (what train.py exports)'),
    "EVAL_FILES": (lambda v: _names(v, ".npy") and "meta.npy" not in v,
                   'EVAL_FILES = ["images.npy", "labels.npy"]  (arrays in DATA/<split>/)'),
}


def _names(v, suffix):
    return isinstance(v, list) and 1 <= len(v) <= 16 and len(set(v)) == len(v) and all(
        isinstance(n, str) and FILE_NAME.fullmatch(n) and n.endswith(suffix) for n in v)


def project_constants(path=PROJECT, names=tuple(DECLARATIONS), text=None):
    """The project's declarations `names`: literal top-level assignments in prepare_data.py (`text`, if given, is its
    content), read without importing it. The harness reads METRIC and DIRECTION here too (project_metric)."""
    try:
        tree = ast.parse(Path(path).read_text() if text is None else text, str(path))
    except (OSError, SyntaxError, ValueError) as e:
        raise SetupError(f"cannot read the project's {path} ({type(e).__name__}: {e})")
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):   # not a literal
                value = None
            found.setdefault(node.targets[0].id, []).append(value)
    out = {}
    for name in names:
        valid, example = DECLARATIONS[name]
        values = found.get(name, [])
        if len(values) != 1 or not valid(values[0]):
            how = "declares it more than once" if len(values) > 1 else "has no valid literal for it"
            seen = ("none" if not values else "an expression, not a literal" if values[0] is None else
                    repr(values[0])[:80])
            raise SetupError(f"{Path(path).name} {how}: write {name} once, as a literal on its own line: {example}"
                             f" (found {seen})")
        out[name] = values[0]
    return out


def load_score(path=PROJECT):
    """The project's score function, its module imported by path (in the container: /workspace/prepare_data.py)."""
    spec = importlib.util.spec_from_file_location("prepare_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SetupError(f"cannot import the project's {Path(path).name} ({type(e).__name__}: {e})")
    if not callable(getattr(module, "score", None)):
        raise SetupError(f"{Path(path).name} must define score(encode, split) -> {{metric: number}} (README: Fork it)")
    return module.score


def read_split(data, split, files):
    """{"meta": meta.json, stem: array} for meta.json and the split's `files`: from a data directory, or with data "-"
    from a tar stream on stdin that holds exactly those (how run.sh passes them, so that no file in the evaluation
    container holds the split and only this process, not the one running the graphs, ever has it)."""
    names = ["meta.json"] + [f"{split}/{f}" for f in files]
    got = {}
    if str(data) == "-":
        try:
            with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
                for m in tar:
                    if not m.isreg() or m.name not in names or m.name in got:
                        raise SetupError(f"unexpected entry {m.name[:80]!r} in the data on stdin (expected {names})")
                    got[m.name] = tar.extractfile(m).read()
        except tarfile.TarError as e:
            raise SetupError(f"cannot read the data on stdin as a tar stream ({e})")
    else:
        got = {n: (Path(data) / n).read_bytes() for n in names if (Path(data) / n).is_file()}
    if len(got) != len(names):
        raise SetupError(f"no prepared {split} split in {data} (expected {names}); run python prepare_data.py first")
    try:
        out = {"meta": json.loads(got["meta.json"])}
        for f in files:
            out[f.removesuffix(".npy")] = np.load(io.BytesIO(got[f"{split}/{f}"]), allow_pickle=False)
    except ValueError as e:
        raise SetupError(f"cannot read the {split} split ({e})")
    return out


def read_handoff(run_dir, name):
    """The bytes of one hand-off file, None if it is missing. Only a regular file of at most its cap: never a
    symlink (no-follow), never a FIFO (non-blocking open) or a device."""
    cap = MAX_STATS_BYTES if name == STATS else MAX_PROGRAM_BYTES
    try:
        fd = os.open(Path(run_dir) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Refused(f"cannot open {name} in the run directory ({os.strerror(e.errno)}); "
                      "the hand-off may hold regular files only")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{name} in the run directory is not a regular file; the hand-off may hold regular "
                          "files only")
        if st.st_size > cap:
            raise Refused(f"{name} is {st.st_size} bytes, more than the {cap} allowed")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise Refused(f"{name} is more than the {cap} bytes allowed")
    return data


def read_train_stats(data, notes):
    """The informational numbers of train_stats.json, keeping only real finite numbers (never echo strings). What no
    parse or float holds (nesting past the parser's recursion, an integer past a float) is a note, never a crash."""
    try:
        stats = json.loads(data)
    except (TypeError, ValueError, RecursionError):
        notes.append(f"note: no readable {STATS} in the run directory")
        return {}
    out = {}
    for k in STAT_KEYS:
        v = stats.get(k) if isinstance(stats, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max:   # no NaN
            out[k] = v
        else:
            notes.append(f"note: {STATS} has no valid number for {k}")
    return out


# ----------------------------------------------------------------------------------------------- the child
def _not_dumpable():
    """Other processes of our uid (the encoder child) can then neither read our memory nor open our file
    descriptors through /proc, nor ptrace us; there is no Yama on every kernel to stop them otherwise."""
    if sys.platform == "linux":
        import ctypes
        if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
            raise Refused(f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}")


def _one_line(s, limit=300):
    """Text from the child, safe to print: printable ASCII on one bounded line."""
    return " ".join(re.sub(r"[^\x20-\x7e]", " ", s).split())[:limit]


# Frames on the pipes between parent and child: 8-byte little-endian length, then the body.
def _read_exact(fd, n, deadline=None):
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None and not select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
            raise TimeoutError
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _write_all(fd, data, deadline=None):
    view = memoryview(data)
    while view:
        if deadline is not None and not select.select([], [fd], [], max(0, deadline - time.monotonic()))[1]:
            raise TimeoutError
        view = view[os.write(fd, view):]


def _send(fd, body, deadline=None):
    _write_all(fd, struct.pack("<Q", len(body)) + body, deadline)


def _recv(fd, cap=None, deadline=None):
    n = struct.unpack("<Q", _read_exact(fd, 8, deadline))[0]
    if cap is not None and n > cap:
        raise Refused(f"the encoder process sent {n} bytes where at most {cap} fit")
    return _read_exact(fd, n, deadline)


CHILD_ENV = ("PATH", "HOME", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


class Child:
    """The parent's end of the child that runs the graphs: one time limit over everything, and nothing taken from
    it but bounded, shape-checked float32 arrays (and, on failure, one sanitized line)."""

    def __init__(self, programs):
        self.deadline, self.programs = None, programs
        r, w = os.pipe()
        env = {k: os.environ[k] for k in CHILD_ENV if k in os.environ}
        env.update(TORCH_FORCE_WEIGHTS_ONLY_LOAD="1", OMP_WAIT_POLICY="PASSIVE")
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from engine import evaluator; "
                "evaluator.encoder_child(int(sys.argv[2]), sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", code, str(ROOT), str(w), *programs],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, pass_fds=(w,))
        os.close(w)
        self.to_child, self.from_child = self.proc.stdin.fileno(), r
        os.set_blocking(self.to_child, False)
        os.set_blocking(r, False)

    def talk(self, requests, tag, cap):
        """Sends the request frames, returns the body of the reply, which must carry `tag` and fit in cap bytes.
        TimeoutError once the evaluation's time is up."""
        try:
            for body in requests:
                _send(self.to_child, body, self.deadline)
            reply = _recv(self.from_child, 1 + max(cap, 4096), self.deadline)  # room for an error line
        except (EOFError, BrokenPipeError):
            self.proc.kill()
            rc = self.proc.wait()
            raise Refused(f"the encoder process died ({f'signal {-rc}' if rc < 0 else f'exit code {rc}'})")
        if reply[:1] == b"E":
            raise Refused(_one_line(reply[1:].decode("ascii", "replace")))
        if reply[:1] != tag:
            raise Refused("the encoder process sent a malformed reply")
        return reply[1:]

    def run(self, which, arrays):
        """Outputs [rows, D] of program `which` on one batch."""
        buf = io.BytesIO()
        for a in arrays:
            np.save(buf, a, allow_pickle=False)
        rows = len(arrays[0])
        body = self.talk([bytes([which, len(arrays)]) + buf.getvalue()], b"A", 8 + rows * MAX_DIM * 4)
        n, dim = struct.unpack("<II", body[:8]) if len(body) >= 8 else (-1, 0)
        if n != rows or not 1 <= dim <= MAX_DIM or len(body) != 8 + n * dim * 4:
            raise Refused(f"{self.programs[which]} returned shape ({n}, {dim}) for {rows} inputs; expected "
                          f"[{rows}, D] with D <= {MAX_DIM}")
        return np.frombuffer(body, "<f4", offset=8).reshape(n, dim)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        os.close(self.from_child)


def _deterministic(torch):
    """Full float32 on a GPU too, and the same kernels for the same shapes: TF32 rounds the inputs of matmuls and
    convolutions to 10 bits, and a kernel picked anew may add in another order (BATCH_TOLERANCE is 0: bitwise)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _load_program(torch, raw, device):
    """(module, its device, its state, a copy of that state) of one checked archive; its graph on `device` where
    torch can move it, else on the CPU."""
    ep = torch.export.load(io.BytesIO(raw))
    check_graphs(ep)
    dev = device
    if device != "cpu":
        try:
            from torch.export.passes import move_to_device_pass
            ep = move_to_device_pass(ep, device)
        except Exception:
            dev = "cpu"
    module = ep.module()
    # Everything the graph could write to and read back in its next call: weights, buffers, constants.
    state = [t for t in itertools.chain(module.parameters(), module.buffers(), (
        v for m in module.modules() for v in vars(m).values())) if isinstance(t, torch.Tensor)]
    return module, dev, state, [t.clone() for t in state]


def _answer(torch, model, request):
    """One batch through one program: its output as little-endian float32 [batch, D], checked first."""
    module, dev, state, pristine = model
    f = io.BytesIO(request[2:])
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.load(f, allow_pickle=False)).to(dev) for _ in range(request[1])])
    if not all(torch.equal(a, b) for a, b in zip(state, pristine)):
        raise Refused("the graph changed its own weights, buffers or constants; nothing may carry over "
                      "from one batch to the next")
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] > MAX_DIM:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise Refused(f"it returned {shape}, expected a tensor [batch, D] with D <= {MAX_DIM}")
    return out.detach().float().cpu().contiguous().numpy().astype("<f4", copy=False)


def encoder_child(reply_fd, programs):
    """The child: loads the archives sent on stdin, then answers each batch with the program's outputs on reply_fd.
    It runs the untrusted graphs, so what it sends is checked by the parent, never believed. Inputs reach a program
    as tensors of the dtype and shape the project gave them."""
    import torch
    with contextlib.suppress(ImportError):
        import torch._export.serde.serialize  # noqa: F401 -- what the first load imports (1 s), imported while we wait
    _deterministic(torch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models, stage = [], programs[0]
    try:
        for stage in programs:
            models.append(_load_program(torch, _recv(0), device))
        _send(reply_fd, b"R" + bytes(m[1] != device for m in models))   # which fell back to the CPU
        while True:
            try:
                request = _recv(0)
            except EOFError:
                return
            stage = programs[request[0]]
            out = _answer(torch, models[request[0]], request)
            _send(reply_fd, b"A" + struct.pack("<II", *out.shape) + out.tobytes())
    except Exception as e:
        what = f"cannot load {stage}" if len(models) < len(programs) else f"{stage} failed on the evaluation data"
        why = f": {e}" if isinstance(e, Refused) else f" ({type(e).__name__}: {e})"
        _send(reply_fd, b"E" + (what + why).encode("ascii", "replace"))


# ----------------------------------------------------------------------------------------------- scoring

def _run_all(child, which, arrays, order, batch):
    """Outputs for `order` (row indices, possibly repeated), in that order, sent to the child `batch` rows at a time."""
    parts = [child.run(which, [a[idx] for a in arrays]) for idx in np.split(order, range(batch, len(order), batch))]
    sizes = sorted({p.shape[1] for p in parts})
    if len(sizes) != 1:
        raise Refused(f"{child.programs[which]} returned outputs of different sizes {sizes}")
    out = np.concatenate(parts)
    if not np.isfinite(out).all():
        raise Refused(f"{child.programs[which]} returned non-finite outputs")
    return out


def passes(n, rng):
    """The two passes over n rows: (order, batch size). The first sends the rows in a secret random order, padded with
    copies of other rows to whole batches of b (at most BATCH, at most half the rows); the second is the same order
    shifted by half a batch. So every batch has b rows in both passes (the same kernels: a row-wise graph gives the
    same bits), and every row has other batch-mates in the second (where b > 1; a row alone has none)."""
    b = max(1, min(BATCH, -(-n // 2)))
    order = rng.permutation(n)
    order = np.concatenate([order, rng.choice(order[:n - n % b], -n % b, replace=False)]) if n % b else order
    return order, np.roll(order, b // 2), b


def _check_batch_independence(program, order, outputs):
    """Each row's output must depend on that row alone: wherever it was sent (twice in two batch compositions, a third
    time where it pads a batch), it must be the same, to BATCH_TOLERANCE of its norm (0: bitwise). In float64 (no
    overflow), with no floor (a scaled-down output is held to the same precision), on every row (a graph that cheats
    on some rows only is refused all the same). Returns each row's output."""
    ref = np.empty((order.max() + 1, outputs.shape[1]), dtype=outputs.dtype)
    ref[order[::-1]] = outputs[::-1]   # each row's first output
    a, b = outputs.astype(np.float64), ref[order].astype(np.float64)
    size = np.maximum(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    drift = np.linalg.norm(a - b, axis=1) / np.where(size > 0, size, 1)
    changed = np.unique(order[drift > BATCH_TOLERANCE])
    if len(changed):
        raise Refused(f"{program} gives a different output for the same input in another batch ({len(changed)} of "
                      f"{len(ref)} rows changed, by up to {drift.max():.3g} of their norm, allowed "
                      f"{BATCH_TOLERANCE:g}): each row's output must depend on that row alone, not on the rest of the "
                      f"batch (AUTORESEARCH_BATCH_TOLERANCE, for hardware that does not repeat its results)")
    return ref


class Encode:
    """What score() gets as `encode`: encode(program, *inputs) -> float32 [rows, D], the program's outputs on all
    rows of the inputs (numeric arrays, rows first), row i for row i. The rows go to the child in a fresh secret
    order, in batches of at most half of them, so the graphs never see which row goes with which answer; then all of
    them again, in another secret order and batch size, for _check_batch_independence. The first refusal sticks: a
    score() that catches it is refused all the same."""

    def __init__(self, child):
        self.child, self.error = child, None
        self.rng = np.random.default_rng(secrets.randbits(64))

    def __call__(self, program, *inputs):
        if self.error is None:
            try:
                return self._run(program, [np.asarray(a) for a in inputs])
            except (Refused, SetupError, TimeoutError) as e:
                self.error = e
        raise self.error

    def _run(self, program, arrays):
        if program not in self.child.programs:
            raise SetupError(f"score() ran {program!r}, which is not in PROGRAMS {self.child.programs}")
        n = len(arrays[0]) if arrays and arrays[0].ndim else 0
        if not n or any(a.ndim == 0 or len(a) != n or a.dtype.kind not in "biuf" for a in arrays):
            raise SetupError(f"score() must give {program} numeric arrays with the same number of rows (at least 1), "
                             f"got {[(a.shape, a.dtype.str) for a in arrays]}")
        which = self.child.programs.index(program)
        first, second, b = passes(n, self.rng)
        order = np.concatenate([first, second])
        return _check_batch_independence(program, order, np.concatenate(
            [_run_all(self.child, which, arrays, first, b), _run_all(self.child, which, arrays, second, b)]))


def trusted_lines(result, metric, split):
    """score()'s result as the block's first lines: <split>_<METRIC> first, then the others in their order."""
    if not (isinstance(result, dict) and metric in result and all(
            isinstance(k, str) and NAME.fullmatch(k) and isinstance(v, numbers.Real) and not isinstance(v, bool)
            for k, v in result.items())):
        raise SetupError(f"score() must return a dict {{name: number}} that holds METRIC {metric!r}, names in "
                         f"[a-z0-9_]; it returned {str(result)[:120]}")
    bad = sorted(k for k, v in result.items() if not math.isfinite(v))
    if bad:
        raise Refused(f"score() gave non-finite values for {bad}")
    return [f"{split}_{k}: " + (f"{int(result[k])}" if isinstance(result[k], numbers.Integral) else
                                f"{float(result[k]):.6g}") for k in [metric, *(k for k in result if k != metric)]]


def checked_program(run_dir, name):
    """The hand-off's program `name`, checked and rebuilt (check_archive), else Refused naming it."""
    raw = read_handoff(run_dir, name)
    if raw is None:
        raise Refused(f"missing model file {Path(run_dir) / name} (train.py must export it with torch.export.save)")
    try:
        return check_archive(raw)
    except Refused as e:
        raise Refused(f"cannot load {Path(run_dir) / name}: {e}")


def evaluate(run_dir, data, split="val"):
    """Prints the trusted block on stdout, all at the end and in whole lines: the project's metrics (METRIC first),
    notes, the training stats and eval_seconds."""
    project = project_constants()
    programs = project["PROGRAMS"]
    _not_dumpable()
    child = Child(programs)  # starts now: it imports torch while we wait for the split and check the archives
    try:
        score = load_score()
        # run.sh starts this container while train.py still trains and sends the split once the hand-off is copied
        # out: the time limit and eval_seconds count from then
        inputs = read_split(data, split, project["EVAL_FILES"])
        t0 = time.monotonic()
        child.deadline = t0 + 0.9 * float(setting("AUTORESEARCH_EVAL_TIMEOUT"))  # our message first
        archives = [checked_program(run_dir, name) for name in programs]
        notes = []
        stats = read_train_stats(read_handoff(run_dir, STATS), notes)
        fell_back = child.talk(archives, b"R", len(programs))[:len(programs)]
        notes += [f"note: could not move {name} to the GPU; evaluated on the CPU"
                  for name, f in zip(programs, fell_back) if f]
        encode = Encode(child)
        try:
            result = score(encode, inputs)
        except (Refused, SetupError, TimeoutError):
            raise
        except Exception as e:
            raise encode.error or Refused(f"score() in prepare_data.py failed ({type(e).__name__}: {e})")
        if encode.error:
            raise encode.error
    finally:
        child.close()
    lines = trusted_lines(result, project["METRIC"], split) + notes
    lines += [f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items()]
    lines.append(f"eval_seconds: {time.monotonic() - t0:.1f}")
    print("\n".join(lines), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--evaluate", type=Path, metavar="RUN_DIR", help="score the hand-off in RUN_DIR")
    what.add_argument("--names", choices=["val", "test"],
                      help="print PROGRAMS, then meta.json and the split's EVAL_FILES, one line each (for run.sh)")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--data", default=None, help="the data directory (default: $AUTORESEARCH_DATA, else ./data); '-': "
                                                "meta.json and the split's files as a tar stream on stdin (run.sh)")
    args = p.parse_args(argv)
    try:
        if args.names:
            c = project_constants()
            print(" ".join(c["PROGRAMS"]))
            print(" ".join(["meta.json"] + [f"{args.names}/{f}" for f in c["EVAL_FILES"]]))
        else:
            evaluate(args.evaluate, args.data or setting("AUTORESEARCH_DATA"), args.split)
        return 0
    except Refused as e:
        print(f"evaluator.py: error: {_one_line(str(e), 1000)}", file=sys.stderr)
        return 1
    except SetupError as e:
        print(f"evaluator.py: error: {_one_line(str(e), 1000)}", file=sys.stderr)
        return 2
    except TimeoutError:
        print("evaluator.py: error: evaluating the exported model took too long (AUTORESEARCH_EVAL_TIMEOUT)",
              file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        print("evaluator.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
