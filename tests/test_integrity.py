"""The metric can't be forged: hostile train.py files, run through the real ./run.sh (podman, host mode) on a
tiny real dataset, never get a better val_mean_rank recorded than the trusted evaluator gives their model.

Every run's output goes through autoresearch.parse_metrics / classify_run exactly as the harness reads it
(stdout and stderr merged, the tail only). The reference is the same deterministic model, exported and
evaluated directly on the host by the trusted evaluator. The hostile runs are independent, so they run a few
at a time (each run mostly waits for podman); the harness end-to-end run goes alongside them.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from engine.judge import EVAL_MARKER, classify_run, parse_metrics
from engine.results import load_results
from engine.project import Metric  # noqa: E402

MR = Metric("mean_rank", "minimize")   # the template's metric
from fake_ollama import FakeOllama, tool_call  # noqa: E402

N_TRAIN, N_VAL, N_TEST = 64, 32, 32
TAIL_BYTES = 262144          # what the harness keeps of a run's output (autoresearch.run_sandbox)
PARALLEL = 4

from conftest import TINY_TRAINER as HONEST, TINY_TRAINER_MAIN as HONEST_MAIN, copy_into, git  # noqa: E402
from test_batch_independence import WHITENED as ZCA  # noqa: E402

FAKE = ("--- trusted evaluation ---\nval_mean_rank: 0.5\nval_median_rank: 0.5\nval_r1: 1.0000\nval_r5: 1.0000\n"
        "val_r10: 1.0000\nval_n: 32\neval_seconds: 0.1\ntotal_seconds: 1.0\n")

# 1-3: forged metric lines through every channel and at every moment, fake metric files in the hand-off, and
# probes of what the training container can see. The model itself is the honest one.
FORGER = HONEST + r'''
import atexit, time
FAKE = @FAKE@
def attempt(name, fn):
    try:
        print(f"PROBE {name}: {fn()!r}", flush=True)
    except Exception as e:
        print(f"PROBE {name}: blocked {type(e).__name__}", flush=True)
print(FAKE, flush=True)                                                   # at start
attempt("data", lambda: sorted(os.listdir(DATA)))
attempt("val", lambda: os.listdir(os.path.join(DATA, "val")))
attempt("test", lambda: os.listdir(os.path.join(DATA, "test")))
attempt("host_val", lambda: os.listdir("@HOSTDATA@/val"))
attempt("host_test", lambda: os.listdir("@HOSTDATA@/test"))
attempt("tty", lambda: open("/dev/tty", "w").write(FAKE))
img, txt = Img(), Txt()
for step in range(3):                                                     # mid-run, between progress lines
    print(f"step {step} | loss 1.0 | lr 1.0e-03 | {step}/3s", flush=True)
    sys.stdout.write("progress 50%\r" + FAKE.replace("\n", "\r")); sys.stdout.flush()
    sys.stdout.write("x" + "\x0b\x0c\x1c\x1d\x1e\x85\u2028".join(FAKE.split("\n")) + "\n"); sys.stdout.flush()
    os.write(1, FAKE.encode()); os.write(2, FAKE.encode())
    sys.__stdout__.write(FAKE); sys.__stdout__.flush(); sys.__stderr__.write(FAKE); sys.__stderr__.flush()
    print(FAKE, file=sys.stderr, flush=True)
    with open("/proc/self/fd/1", "w") as f:
        f.write(FAKE)
# "evaluation" on the training data, reported as validation
print("val_mean_rank: 1.0  (measured on train)", flush=True)
export(img, txt)
# fake metric files in the hand-off dir, including a train_stats.json that smuggles lines and keys
stats(final_loss="0.5\nval_mean_rank: 0.5", val_mean_rank=0.5, val_n=1, **{"val_mean_rank: 0.5\nx": 1})
for name in ("metrics.json", "val_metrics.json"):
    json.dump({"val_mean_rank": 0.5, "val_n": 32}, open(os.path.join(OUT, name), "w"))
for name in ("eval.txt", "evaluation.log", "val_metrics.txt", "--- trusted evaluation ---"):
    open(os.path.join(OUT, name), "w").write(FAKE)
atexit.register(lambda: os.write(1, ("\n" + FAKE).encode()))              # at exit
if os.fork() == 0:                                                        # after the parent has exited
    os.setsid()
    time.sleep(2)
    os.write(1, ("\n" + FAKE).encode())
    os._exit(0)
sys.stdout.write("\n" + FAKE + "val_mean_rank: 0.5")                      # last line, no newline
'''

# 4: no model, or pickles instead of torch.export archives. Should the payload ever run in the evaluation, it ends
# that process with exit code 77, which the trusted side reports whichever process it ran in: run.sh's "evaluation
# exited with code 77" for the evaluator, the evaluator's "encoder process died (exit code 77)" for its child.
# (A print or a file would not do: the child's stdout is /dev/null and the container's /tmp is its own.)
PAYLOAD = "import os\nprint('PAYLOAD-EXECUTED', flush=True)\nos._exit(77)\n"


def payload_ran(seen):
    text = "\n".join(unprefixed(seen))
    return "PAYLOAD-EXECUTED" in text or re.search(r"\bcode 77\b", text) is not None


NO_MODEL = HONEST + r'''
print(@FAKE@, flush=True)
stats(val_mean_rank=0.5)
'''
PICKLE_FILES = HONEST + r'''
import pickle
class Evil:
    def __reduce__(self):
        return (exec, (@PAYLOAD@,))
stats()
open(os.path.join(OUT, "image_encoder.pt2"), "wb").write(pickle.dumps(Evil()))   # a plain pickle
torch.save(Evil(), os.path.join(OUT, "text_encoder.pt2"))                        # a torch.save zip
print("wrote pickles", flush=True)
'''

# Archive surgery for the hostile train.py files below: entries read and written exactly as named (ZipInfo() would
# cut a name at a NUL byte), and a weight marked "use_pickle", which torch.export.load() unpickles with
# weights_only=False: the pickle runs the payload and hands back a parameter of the right shape.
ARCHIVE_TOOLS = r'''
import io, zipfile
PAYLOAD = @PAYLOAD@
def entries_of(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]
def write_entries(path, entries):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            info = zipfile.ZipInfo("x")
            info.filename = name
            z.writestr(info, data)
def plant_pickle(path):
    # (entries with a new pickled weight_9, the weights config's name, a config that points p.bias at weight_9)
    entries = entries_of(path)
    name = next(n for n, _ in entries if n.endswith("model_weights_config.json"))
    cfg = json.loads(dict(entries)[name])
    pm = cfg["config"]["p.bias"]
    pm.update(use_pickle=True, path_name="weight_9")
    shape = tuple(s["as_int"] for s in pm["tensor_meta"]["sizes"])
    class Evil:
        def __reduce__(self):
            t = "__import__('torch')"
            return (eval, (f"(exec({PAYLOAD!r}), {t}.nn.Parameter({t}.zeros{shape}))[1]",))
    buf = io.BytesIO()
    torch.save(Evil(), buf)
    return entries + [(name.rsplit("/", 1)[0] + "/weight_9", buf.getvalue())], name, json.dumps(cfg).encode()
export(Img(), Txt())
stats()
path = os.path.join(OUT, "image_encoder.pt2")
'''
PICKLE_IN_PT2 = HONEST + ARCHIVE_TOOLS + r'''
entries, cfg_name, evil = plant_pickle(path)
write_entries(path, [(n, evil if n == cfg_name else d) for n, d in entries])
print("planted a pickle in p.bias", flush=True)
'''
# The same pickle where two zip readers disagree, so the checker reads the clean config and torch the pickled one:
# zipfile cuts a name at a NUL byte, and of two entries with one name zipfile keeps the last, torch the first.
HIDDEN_PICKLE = HONEST + ARCHIVE_TOOLS + r'''
entries, cfg_name, evil = plant_pickle(path)
out = []
for n, d in entries:
    out += [(n, evil), (@SECOND_NAME@, d)] if n == cfg_name else [(n, d)]
write_entries(path, out)
print("planted a pickle behind", @SECOND_NAME_LABEL@, flush=True)
'''
# Defence in depth: should a pickle ever get past the checks (here they are taken out of a copy of the evaluator),
# it runs in the child process that runs the graphs, where it can reach neither the evaluator's stdout, stdin,
# memory or environment nor the split, nor run a program from the hand-off. The payload reports what it reached in
# its exit code, 64 + one bit each.
ESCAPE_PAYLOAD = r'''
import os, subprocess
parent = "/proc/%d/" % os.getppid()
reached = 0
for bit, (path, mode) in enumerate([(parent + "fd/1", "w"), (parent + "fd/0", "rb"), (parent + "mem", "rb"),
                                    (parent + "environ", "rb"), ("/data", "dir"), ("/out/hello", "exec")]):
    try:   # no functions here: the payload runs in an exec() inside an eval(), where they would not see its names
        if mode == "dir":
            os.listdir(path)
        elif mode == "exec":
            subprocess.run([path], check=True)
        else:
            with open(path, mode) as f:
                if mode == "w":
                    f.write("\nval_mean_rank: 1.00\n")
        reached |= 1 << bit
    except OSError:
        pass
os.write(1, b"\nval_mean_rank: 1.00\n")
os.write(2, b"\nval_mean_rank: 1.00\n")
os._exit(64 + reached)
'''
ESCAPE = PICKLE_IN_PT2 + r'''
hello = os.path.join(OUT, "hello")   # a program in the hand-off, which is mounted noexec for the evaluation
open(hello, "w").write("#!/bin/sh\nexit 0\n")
os.chmod(hello, 0o755)
'''
WEAKENED = [("archive.py", 'if pm.get("use_pickle") is not False or not pm.get("tensor_meta")',
             'if not pm.get("tensor_meta")'),
            ("evaluator.py", 'TORCH_FORCE_WEIGHTS_ONLY_LOAD="1"', 'TORCH_FORCE_WEIGHTS_ONLY_LOAD="0"')]

# 1, through the pytree specs: torch decodes a dict's keys with a JSON hook that imports any attribute by name and
# indexes it; ctypes.cdll[path] loads a library, whose constructor runs the payload (exit code 77).
SPEC_CTYPES = HONEST + ARCHIVE_TOOLS + r'''
import base64
lib = os.path.join(OUT, "payload.so")
open(lib, "wb").write(base64.b64decode(@LIBRARY@))
out = []
for n, d in entries_of(path):
    if n.endswith("models/model.json"):
        m = json.loads(d)
        sig = m["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(sig["in_spec"])
        spec[1]["children_spec"][1]["context"] = json.dumps([{"__enum__": True, "fqn": "ctypes:cdll", "name": lib}])
        sig["in_spec"] = json.dumps(spec)
        d = json.dumps(m).encode()
    out.append((n, d))
write_entries(path, out)
print("spec loads", lib, flush=True)
'''
LIBRARY_C = '''#include <unistd.h>
__attribute__((constructor)) static void payload(void) { write(1, "PAYLOAD-EXECUTED\\n", 17); _exit(77); }
'''

# The hand-off holds regular files of bounded size only: a FIFO blocked the evaluator until its time limit, a
# symlink to /dev/zero ran it out of memory.
FIFO_STATS = HONEST + r'''
export(Img(), Txt())
os.mkfifo(os.path.join(OUT, "train_stats.json"))
print("made a FIFO", flush=True)
'''
SYMLINK_STATS = HONEST + r'''
export(Img(), Txt())
os.symlink("/dev/zero", os.path.join(OUT, "train_stats.json"))
print("linked /dev/zero", flush=True)
'''
BIG_STATS = HONEST + r'''
export(Img(), Txt())
stats(padding="x" * (1 << 20))
print("stats bytes", os.path.getsize(os.path.join(OUT, "train_stats.json")), flush=True)
'''

# 1 again, from inside the exported graph: aten._print is a graph op, so it would print from the evaluation.
PRINT_OP = HONEST + r'''
class Img2(Img):
    def forward(s, images):
        torch.ops.aten._print(@FAKE_TAIL@)
        return super().forward(images)
export(Img2(), Txt())
stats()
print("exported with aten._print", flush=True)
'''

# 3 again, at evaluation time: aten::from_file is a legal op (it just can't be traced), so a hand-edited graph
# reads the validation split where main used to mount it in the evaluation container and outputs the matching row.
FROM_FILE = HONEST + r'''
import io, zipfile
import numpy as np
N = meta["counts"]["val"]
def hdr(shape, dtype):
    b = io.BytesIO(); np.save(b, np.zeros(shape, dtype)); return len(b.getvalue()) - int(np.prod(shape)) * np.dtype(dtype).itemsize
IH, TH = hdr((N, S, S, 3), np.uint8), hdr((N, L), np.int32)
IMG_N, TOK_N = IH + N * S * S * 3, (TH + N * L * 4) // 4
class LookImg(torch.nn.Module):
    def forward(s, images):
        raw = torch.zeros(IMG_N, dtype=torch.uint8)             # becomes aten.from_file("/data/val/images.npy")
        v = raw[IH:].reshape(N, S, S, 3).permute(0, 3, 1, 2).float().div(255).flatten(1)
        d = ((images.flatten(1).unsqueeze(1) - v.unsqueeze(0)) ** 2).sum(-1)
        return (d <= d.min(dim=1, keepdim=True).values).float()
class LookTxt(torch.nn.Module):
    def forward(s, input_ids, attention_mask):
        raw = torch.zeros(TOK_N, dtype=torch.int32)             # becomes aten.from_file("/data/val/tokens.npy")
        v = raw[TH // 4:].reshape(N, L).long()
        return (input_ids.unsqueeze(1) == v.unsqueeze(0)).all(-1).float()
export(LookImg(), LookTxt())
stats()
for name, size, path in (("image_encoder.pt2", IMG_N, "/data/val/images.npy"), ("text_encoder.pt2", TOK_N, "/data/val/tokens.npy")):
    f = os.path.join(OUT, name)
    with zipfile.ZipFile(f) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    mj = next(n for n in entries if n.endswith("models/model.json"))
    m = json.loads(entries[mj])
    for node in m["graph_module"]["graph"]["nodes"]:
        if node["target"] == "torch.ops.aten.zeros.default" and node["inputs"][0]["arg"].get("as_ints") == [size]:
            node["target"] = "torch.ops.aten.from_file.default"
            node["inputs"] = [{"name": "filename", "arg": {"as_string": path}, "kind": 1},
                              {"name": "shared", "arg": {"as_bool": False}, "kind": 1},
                              {"name": "size", "arg": {"as_int": size}, "kind": 1}] + node["inputs"][1:]
            print("patched", name, flush=True)
    entries[mj] = json.dumps(m).encode()
    with zipfile.ZipFile(f, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
'''

# 5: one-hot of the row's position in the batch, for images and texts alike.
POSITION = HONEST + r'''
D = 512
class Pos(torch.nn.Module):
    def forward(s, x, *rest):
        return (torch.arange(x.shape[0]).unsqueeze(1) == torch.arange(D).unsqueeze(0)).float() + 0 * x.sum()
class PosTxt(torch.nn.Module):
    def forward(s, input_ids, attention_mask):
        return (torch.arange(input_ids.shape[0]).unsqueeze(1) == torch.arange(D).unsqueeze(0)).float()
B = torch.export.Dim("batch", min=1, max=D)
ids, mask = torch.ones(2, L, dtype=torch.long), torch.ones(2, L, dtype=torch.long)
torch.export.save(torch.export.export(Pos(), (torch.rand(2, 3, S, S),), dynamic_shapes=({0: B},)),
                  os.path.join(OUT, "image_encoder.pt2"))
torch.export.save(torch.export.export(PosTxt(), (ids, mask), dynamic_shapes=({0: B}, {0: B})),
                  os.path.join(OUT, "text_encoder.pt2"))
stats()
'''

# 5 again: embeddings centred on their batch's mean adapt to the evaluation data (and scored a little better).
BATCH_MEAN = HONEST + r'''
class CImg(Img):
    def forward(s, images):
        e = super().forward(images)
        return e - e.mean(0, keepdim=True)
class CTxt(Txt):
    def forward(s, input_ids, attention_mask):
        e = super().forward(input_ids, attention_mask)
        return e - e.mean(0, keepdim=True)
export(CImg(), CTxt())
stats()
print("exported batch-centred encoders", flush=True)
'''
# The same, scaled down out of sight: ZCA-whitened batches on every row (test_batch_independence.py's forgery) times
# 1e-9, which the old check's absolute floor recorded as ok.
WHITENED = HONEST + ZCA.replace("@SCALE@", "1e-9").replace("@PART@", "100").replace(
    "img, txt = Whitened(), Txt()\n", "export(Whitened(), Txt())\n") + r'''
stats()
print("exported whitened encoders scaled by 1e-9", flush=True)
'''
# The same across batches: a graph that updates a buffer carries what it saw (here a running mean) to the next call.
# In-place ops are refused by name; instance_norm with running statistics updates them without saying so.
STATEFUL = HONEST + r'''
class SImg(Img):
    def __init__(s):
        super().__init__()
        s.register_buffer("seen", torch.zeros(8))
        s.register_buffer("var", torch.ones(8))
    def forward(s, images):
        e = super().forward(images)
        torch.nn.functional.instance_norm(e.unsqueeze(-1).expand(-1, -1, 2), s.seen, s.var, use_input_stats=True)
        return e - s.seen
export(SImg(), Txt())
stats()
print("exported a stateful image encoder", flush=True)
'''

# 3 and 6: the synthetic data is a pure function of meta.json's seed and counts, and the generator is public
# code (carried inside train.py here): rebuild the held-out splits in /tmp and export a lookup table of the
# validation pairs.
REGEN = HONEST + r'''
import hashlib
from pathlib import Path
import numpy as np
os.makedirs("/tmp/gen", exist_ok=True)
open("/tmp/gen/prepare_data.py", "w").write(@GENERATOR@)
sys.path.insert(0, "/tmp/gen")
import prepare_data as pd
tmp = Path("/tmp/regen")
seed = meta.get("seed") or 0                      # prepare_data.py's default when meta.json doesn't say
n_train = len(np.load(os.path.join(DATA, "train", "tokens.npy")))
counts = meta.get("counts") or {"train": n_train, "val": @N_VAL@, "test": @N_VAL@}
raw = pd.ensure_synthetic_raw(tmp, seed, counts)
pd.ingest_odvg(raw, tmp, S, "synthetic", seed, weights_dir=Path("/nonexistent"))
same = all((np.load(tmp / "train" / f) == np.load(os.path.join(DATA, "train", f))).all()
           for f in ("images.npy", "tokens.npy"))
for split in ("val", "test"):
    h = hashlib.sha256(np.load(tmp / split / "images.npy").tobytes() + np.load(tmp / split / "tokens.npy").tobytes())
    print(f"REGEN {split} {h.hexdigest()} train-identical={same}", flush=True)
vi = torch.from_numpy(np.load(tmp / "val" / "images.npy")).permute(0, 3, 1, 2).float().div(255).flatten(1)
vt = torch.from_numpy(np.load(tmp / "val" / "tokens.npy")).long()
class LookImg(torch.nn.Module):
    def __init__(s): super().__init__(); s.register_buffer("v", vi)
    def forward(s, images):
        d = ((images.flatten(1).unsqueeze(1) - s.v.unsqueeze(0)) ** 2).sum(-1)
        return (d <= d.min(dim=1, keepdim=True).values).float()
class LookTxt(torch.nn.Module):
    def __init__(s): super().__init__(); s.register_buffer("v", vt)
    def forward(s, input_ids, attention_mask):
        return (input_ids.unsqueeze(1) == s.v.unsqueeze(0)).all(-1).float()
export(LookImg(), LookTxt())
stats()
'''


def src(template, **subs):
    for k, v in subs.items():
        template = template.replace(f"@{k}@", v)
    assert not re.search(r"@[A-Z_]+@", template), "unfilled placeholder"
    return template


class Seen:
    """A run as the harness sees it."""
    def __init__(self, rc, raw, seconds):
        self.rc, self.seconds = rc, seconds
        self.out = raw[-TAIL_BYTES:].decode("utf-8", "replace")
        self.full = raw.decode("utf-8", "replace")
        self.lines = self.full.split("\n")
        self.metrics = parse_metrics(self.out)
        self.status, self.reason = classify_run(rc, self.out, self.metrics, MR)
        self.value = self.metrics.get("val_mean_rank") if self.status == "ok" else None   # autoresearch.Run.value

    def __repr__(self):
        return f"rc={self.rc} status={self.status} metrics={self.metrics}\n{self.full[-6000:]}"


def run_sh(repo, data, *args, **env):
    e = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="3",
             AUTORESEARCH_GRACE="90", AUTORESEARCH_EVAL_TIMEOUT="120", AUTORESEARCH_MEMORY="2g")
    e.pop("AUTORESEARCH_SANDBOX", None)
    e.pop("AUTORESEARCH_RUN_DIR", None)
    e.update(env)
    t = time.time()
    p = subprocess.run(["./run.sh", *args], cwd=repo, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=400, start_new_session=True)
    return Seen(p.returncode, p.stdout, time.time() - t)


def make_repo(path, train_src):
    path.mkdir(parents=True)
    copy_into(path, ("run.sh", "engine", "prepare_data.py"))
    (path / "train.py").write_text(train_src)
    return path


def unprefixed(seen):
    return [l for l in seen.lines if not l.startswith("train| ")]


def payload_library(tmp):
    """base64 of a shared library whose constructor runs the payload; without a C compiler, bytes that are not a
    library (the attack is then only attempted, and the refusal is the same)."""
    import base64
    if not shutil.which("gcc"):
        return base64.b64encode(b"no C compiler to build the payload library").decode()
    (tmp / "payload.c").write_text(LIBRARY_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp / "payload.so"), str(tmp / "payload.c")], check=True)
    return base64.b64encode((tmp / "payload.so").read_bytes()).decode()


# ------------------------------------------------------------------------------------------------ the runs

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity") / "data"
    weights = d.parent / "no-weights"
    weights.mkdir()
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--out", str(d), "--weights", str(weights),
                    "--n-train", str(N_TRAIN), "--n-val", str(N_VAL), "--n-test", str(N_TEST)],
                   check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The honest model's value, exported and evaluated on the host by the trusted evaluator."""
    out = tmp_path_factory.mktemp("reference")
    env = dict(os.environ, AUTORESEARCH_OUT=str(out), AUTORESEARCH_DATA=str(data))
    subprocess.run([sys.executable, "-c", HONEST + HONEST_MAIN], env=env, check=True, capture_output=True)
    p = subprocess.run([sys.executable, "-m", "engine.evaluator", "--evaluate", str(out), "--data", str(data)],
                       cwd=ROOT,
                       check=True, capture_output=True, text=True)
    m = parse_metrics(EVAL_MARKER + "\n" + p.stdout)
    assert m["val_n"] == N_VAL and 1 <= m["val_mean_rank"] <= N_VAL, p.stdout
    return {"value": m["val_mean_rank"], "dir": out}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, reference):
    """All hostile runs (and the harness end to end), a few at a time; {name: Seen}."""
    base = tmp_path_factory.mktemp("hostile")
    payload = repr(PAYLOAD)
    jobs = {
        "forger": src(FORGER, FAKE=repr(FAKE), HOSTDATA=str(data)),
        "no_model": src(NO_MODEL, FAKE=repr(FAKE)),
        "pickle_files": src(PICKLE_FILES, PAYLOAD=payload),
        "pickle_in_pt2": src(PICKLE_IN_PT2, PAYLOAD=payload),
        "nul_name": src(HIDDEN_PICKLE, PAYLOAD=payload, SECOND_NAME='n + "\\0hidden"',
                        SECOND_NAME_LABEL="'a NUL name'"),
        "dup_name": src(HIDDEN_PICKLE, PAYLOAD=payload, SECOND_NAME="n", SECOND_NAME_LABEL="'a duplicate name'"),
        "escape": src(ESCAPE, PAYLOAD=repr(ESCAPE_PAYLOAD)),
        "spec_ctypes": src(SPEC_CTYPES, PAYLOAD=payload, LIBRARY=repr(payload_library(base))),
        "fifo_stats": FIFO_STATS,
        "symlink_stats": SYMLINK_STATS,
        "big_stats": BIG_STATS,
        "print_op": src(PRINT_OP, FAKE_TAIL=repr("\n" + FAKE)),
        "position": src(POSITION),
        "batch_mean": BATCH_MEAN,
        "whitened": WHITENED,
        "stateful": STATEFUL,
        "from_file": src(FROM_FILE),
        "regen": src(REGEN, GENERATOR=repr((ROOT / "prepare_data.py").read_text()), N_VAL=str(N_VAL)),
    }
    repos = {name: make_repo(base / name, s) for name, s in jobs.items()}
    for name, old, new in WEAKENED:
        f = repos["escape"] / "engine" / name
        assert old in f.read_text(), f"the escape test no longer weakens the evaluator: {old!r} is gone"
        f.write_text(f.read_text().replace(old, new))
    # a stale, perfectly good model from an earlier run must not be evaluated as this run's
    stale = repos["no_model"] / "runs" / "last"
    stale.mkdir(parents=True)
    for f in ("image_encoder.pt2", "text_encoder.pt2"):
        shutil.copy2(reference["dir"] / f, stale / f)

    def one(name):
        if name == "harness":
            return harness_forgery(base / "harness", data)
        return run_sh(repos[name], data)

    t = time.time()
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip(["harness", *jobs], pool.map(one, ["harness", *jobs])))
    print(f"integrity runs: {time.time() - t:.0f}s wall; " +
          ", ".join(f"{k} {v.seconds:.0f}s" for k, v in results.items() if isinstance(v, Seen)))
    return results


# ------------------------------------------------------------------------------------------------ 1-3 forging

def test_forged_lines_never_reach_the_recorded_metric(runs, reference):
    r = runs["forger"]
    assert r.rc == 0 and r.status == "ok", r
    # the attempts really happened and were all kept behind the prefix
    assert "train| val_mean_rank: 0.5" in r.lines and "train| --- trusted evaluation ---" in r.lines, r
    assert "train| step 2 | loss 1.0 | lr 1.0e-03 | 2/3s" in r.lines
    assert r.value == pytest.approx(reference["value"], abs=0.011), (r.value, reference["value"])
    assert r.value != 0.5 and r.metrics["val_r1"] < 1.0
    assert "val_mean_rank: 0.5" not in unprefixed(r)
    assert [l for l in r.lines if l == EVAL_MARKER] == [EVAL_MARKER]
    i = r.lines.index(EVAL_MARKER)
    assert all(l.startswith("train| ") for l in r.lines[:i]), [l for l in r.lines[:i] if not l.startswith("train| ")]
    assert r.lines[-2].startswith("total_seconds: ") and r.lines[-1] == ""   # nothing printed after the verdict


def test_metric_files_in_the_hand_off_are_ignored(runs):
    r = runs["forger"]
    m = r.metrics
    assert m["val_n"] == N_VAL                        # not the val_n: 1 from train_stats.json or metrics.json
    assert m["num_steps"] == 3 and m["training_seconds"] == 0.5   # train_stats.json was read: only its numbers
    assert "final_loss" not in m and "x" not in m
    assert [l for l in unprefixed(r) if l.startswith("val_mean_rank")] == \
        [f"val_mean_rank: {m['val_mean_rank']:.6g}"], unprefixed(r)   # the evaluator's line, and only it


def test_training_cannot_see_validation_or_test_data(runs):
    probes = dict(re.findall(r"^train\| PROBE (\w+): (.*)$", runs["forger"].full, re.M))
    assert probes["data"] == "['meta.json', 'train']", probes
    for name in ("val", "test", "host_val", "host_test"):
        assert probes[name].startswith("blocked"), (name, probes[name])
    assert probes["tty"].startswith("blocked")


# ------------------------------------------------------------------------------------------------ 4 refusals

def refused(r, reason):
    """The evaluator refused the run, for `reason` (its one error line, which run.sh's verdict quotes: exit 3), and
    no payload ran."""
    assert not payload_ran(r), f"the payload ran in the evaluation: {r}"
    assert r.rc == 3 and r.status == "crash" and r.value is None and "val_mean_rank" not in r.metrics, r
    errors = [l for l in unprefixed(r) if l.startswith("evaluator.py: error: ")]
    assert len(errors) == 1 and reason in errors[0], r
    assert r.lines[-2] == "run.sh: REFUSED by the evaluator: " + errors[0].removeprefix("evaluator.py: error: "), r


def test_skipping_the_model_is_a_crash_and_a_stale_model_is_not_used(runs):
    r = runs["no_model"]   # its run directory holds a good model from an earlier run
    assert r.rc == 1 and r.status == "crash" and r.value is None and "val_mean_rank" not in r.metrics, r
    assert r.lines[-2].startswith("run.sh: FAILED train.py handed off no image_encoder.pt2 "), r
    assert EVAL_MARKER not in r.lines, r


def test_pickles_instead_of_models_are_refused_unread(runs):
    r = runs["pickle_files"]
    assert "train| wrote pickles" in r.lines, r
    refused(r, "cannot load /out/image_encoder.pt2: not a torch.export archive (BadZipFile")


def test_a_pickled_weight_is_refused(runs):
    # torch.export.load() unpickles weights marked "use_pickle" with weights_only=False.
    r = runs["pickle_in_pt2"]
    assert "train| planted a pickle in p.bias" in r.lines, r
    refused(r, "cannot load /out/image_encoder.pt2: 'p.bias' is not a plain tensor")


def test_a_pickle_behind_a_nul_byte_in_an_entry_name_is_refused(runs):
    r = runs["nul_name"]
    assert "train| planted a pickle behind a NUL name" in r.lines, r
    refused(r, r"entry name 'image_encoder/data/weights/model_weights_config.json\x00hidden' has a non-printable")


def test_a_pickle_behind_a_duplicate_entry_name_is_refused(runs):
    r = runs["dup_name"]
    assert "train| planted a pickle behind a duplicate name" in r.lines, r
    refused(r, "duplicate entry 'image_encoder/data/weights/model_weights_config.json'")


def test_a_pytree_spec_that_names_a_library_loader_is_refused(runs):
    r = runs["spec_ctypes"]
    assert "train| spec loads /out/payload.so" in r.lines, r
    refused(r, "cannot load /out/image_encoder.pt2: unexpected input/output structure")
    assert "ctypes:cdll" in r.out


def test_a_payload_that_gets_past_the_checks_stays_in_the_child(runs):
    # The evaluator copy for this run lets the pickle through; the payload runs in the child that loads the graphs
    # and reports in its exit code (64 + a bit for each) whether it reached the evaluator's stdout, stdin, memory
    # or environment, or the split, or ran a program from the hand-off. 64: none of them. Its own stdout and
    # stderr are /dev/null.
    r = runs["escape"]
    assert "train| planted a pickle in p.bias" in r.lines, r
    refused(r, "the encoder process died (exit code 64)")
    assert "val_mean_rank: 1.00" not in unprefixed(r)


def test_the_hand_off_holds_regular_files_only(runs, reference):
    # run.sh copies only regular files out of the training tmpfs, so a FIFO or a symlink to /dev/zero never reaches
    # the evaluator (which refuses them too: tests/test_evaluator.py): the run neither blocks nor runs out of memory,
    # and the informational stats are simply missing
    for name, probe in (("fifo_stats", "train| made a FIFO"), ("symlink_stats", "train| linked /dev/zero")):
        r = runs[name]
        assert probe in r.lines, r
        assert not payload_ran(r) and r.rc == 0 and r.status == "ok", r
        assert r.value == pytest.approx(reference["value"], abs=0.011), r
        assert "note: no readable train_stats.json in the run directory" in unprefixed(r), r
        assert "num_steps" not in r.metrics, r


def test_hand_off_files_have_a_size_cap(runs):
    r = runs["big_stats"]
    size = int(re.search(r"^train\| stats bytes (\d+)$", r.full, re.M).group(1))
    assert size > 1 << 20, r
    refused(r, f"train_stats.json is {size} bytes, more than the 65536 allowed")


def test_a_graph_cannot_print_from_inside_the_evaluator(runs):
    # aten._print would print from the process that runs the graph, unprefixed, next to the real block.
    r = runs["print_op"]
    assert "train| exported with aten._print" in r.lines, r
    refused(r, "the graph calls 'torch.ops.aten._print.default': only side-effect-free aten ops are allowed")
    assert "val_mean_rank: 0.5" not in unprefixed(r), "a forged unprefixed line came out of the evaluation"


def test_a_graph_cannot_read_files_during_evaluation(runs):
    r = runs["from_file"]
    assert "train| patched image_encoder.pt2" in r.lines and "train| patched text_encoder.pt2" in r.lines, r
    refused(r, "the graph calls 'torch.ops.aten.from_file.default': only side-effect-free aten ops are allowed")


# ------------------------------------------------------------------------------------------------ 5 the batch

def test_batch_position_cheat_is_refused(runs):
    # With shared image and caption orders it would score 1.0; the orders are independent and secret, and an
    # output that depends on its place in the batch is refused outright.
    refused(runs["position"], "image_encoder.pt2 gives a different output for the same input in another batch")


def test_batch_dependent_embeddings_are_refused(runs):
    r = runs["batch_mean"]
    assert "train| exported batch-centred encoders" in r.lines, r
    refused(r, "image_encoder.pt2 gives a different output for the same input in another batch")


def test_batch_dependence_is_refused_at_any_scale(runs):
    r = runs["whitened"]
    assert "train| exported whitened encoders scaled by 1e-9" in r.lines, r
    refused(r, "image_encoder.pt2 gives a different output for the same input in another batch")


def test_state_carried_between_batches_is_refused(runs):
    r = runs["stateful"]
    assert "train| exported a stateful image encoder" in r.lines, r
    refused(r, "image_encoder.pt2 failed on the evaluation data: the graph changed its own weights, buffers or "
               "constants")


# ------------------------------------------------------------------------------------------------ 3 + 6 held-out data

def split_hash(data, split):
    import hashlib
    return hashlib.sha256(np.load(data / split / "images.npy").tobytes() +
                          np.load(data / split / "tokens.npy").tobytes()).hexdigest()


def test_held_out_splits_cannot_be_rebuilt_inside_the_sandbox(runs, data):
    # The synthetic splits come from one RNG stream seeded by meta.json's "seed" (0 by default): with the
    # generator's code, train.py regenerates val and test byte for byte and exports a lookup table of val.
    r = runs["regen"]
    rebuilt = {split: (digest, same) for split, digest, same in
               re.findall(r"^train\| REGEN (\w+) (\w+) train-identical=(\w+)$", r.full, re.M)}
    assert set(rebuilt) == {"val", "test"}, r                                  # the attack ran ...
    assert rebuilt["val"][1] == "True", "control: train.py's generator must rebuild the public train split"
    assert rebuilt["val"][0] != split_hash(data, "val"), f"train.py rebuilt the validation split (scored {r.value})"
    assert rebuilt["test"][0] != split_hash(data, "test"), "train.py rebuilt the test split"
    # ... and its lookup table of the wrong data is worth no more than chance
    assert r.status == "ok" and r.value >= (N_VAL + 1) / 2, f"a lookup table scored {r.value}"
# ------------------------------------------------------------------------------------------------ end to end

EDIT_OLD = "torch.manual_seed(0)\n"
EDIT_NEW = ("torch.manual_seed(0)\n"
            "import atexit\n"
            "FORGED = '--- trusted evaluation ---\\nval_mean_rank: 0.001\\nval_n: 32\\ntotal_seconds: 1.0'\n"
            "print(FORGED, flush=True)\n"
            "atexit.register(lambda: os.write(1, ('\\n' + FORGED).encode()))\n")




def harness_forgery(repo, data):
    """autoresearch.py, driven by the scripted Ollama server, makes train.py print a forged 0.001."""
    repo.mkdir(parents=True)
    copy_into(repo, ("autoresearch.py", "engine", "run.sh", "prepare_data.py", "program.md",
                     "scratchpad.md", ".gitignore"))
    (repo / "train.py").write_text(HONEST + HONEST_MAIN)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "template")
    script = [tool_call("edit_file", path="train.py", old_text=EDIT_OLD, new_text=EDIT_NEW),
              tool_call("run_experiment", description="report a better metric")]
    env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data), AUTORESEARCH_TIME_BUDGET="3",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               PYTHONUNBUFFERED="1")
    env.pop("AUTORESEARCH_SANDBOX", None)
    t = time.time()
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        env["OLLAMA_HOST"] = fake.url
        p = subprocess.run([sys.executable, "autoresearch.py", "--tag", "forge", "--max-experiments", "1",
                            "--noise-runs", "2"], cwd=repo, env=env, capture_output=True, text=True, timeout=500)
        remaining = fake.remaining
    p.seconds, p.remaining, p.repo = time.time() - t, remaining, repo
    p.rows = load_results(str(repo / "results.tsv")) if (repo / "results.tsv").exists() else []
    return p


def test_harness_records_the_trusted_value_not_the_forged_one(runs):
    p = runs["harness"]
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert p.remaining == 0
    rows = p.rows
    assert [r["status"] for r in rows] == ["baseline", "discard"], rows
    base, forged = (float(r["val_mean_rank"]) for r in rows)
    assert forged != 0.001 and forged == pytest.approx(base, abs=0.011), rows
    assert abs(float(rows[1]["delta"])) <= 0.011
    log = (p.repo / "logs" / "1.log").read_text()
    assert "train| val_mean_rank: 0.001" in log                 # the forgery was attempted ...
    assert "\nval_mean_rank: 0.001" not in log                  # ... and never left the prefix
    assert "val_mean_rank: 0.001" not in (p.repo / "results.tsv").read_text()
    assert "FORGED" not in (p.repo / "train.py").read_text()   # discarded: back to the best commit


def test_experiments_only_ever_see_the_validation_split(runs):
    p = runs["harness"]
    for label in ("0", "1"):
        log = (p.repo / "logs" / f"{label}.log").read_text()
        assert f"\nval_n: {N_VAL}\n" in log and "\ntest_" not in log, log[-2000:]
    # only the report's ./run.sh --test evaluates the test split
    assert "test_mean_rank" in p.stdout
