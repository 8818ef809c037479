"""The trusted evaluator (engine/evaluator.py) on its own, no podman: the split on stdin, the archive it rebuilds
for torch, each archive and hand-off check, the child process's limits, the secret orders, and the contract with the
project (prepare_data.py's declarations and score()). The hostile train.py files that reach these checks through
./run.sh are in test_integrity.py."""
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from conftest import ROOT, TINY_TRAINER, copy_into

sys.path.insert(0, str(ROOT))
from engine import archive as checks, evaluator as ev  # noqa: E402


def trainer(run_dir, data, code="img, txt = Img(), Txt()\n"):
    """conftest's tiny trainer with `code` (which defines img and txt), run in this process: exports into run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = dict(os.environ)
    os.environ.update(AUTORESEARCH_OUT=str(run_dir), AUTORESEARCH_DATA=str(data))
    try:
        exec(TINY_TRAINER + code + "export(img, txt)\nstats(num_params_m='val_mean_rank: 1')\n", {})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return run_dir


def split_tar(data, split="val", extra=(), links=()):
    """The data stream run.sh sends: meta.json and the split's images and tokens, plus `extra` (name, bytes) files;
    the names in `links` go as symlinks instead."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ["meta.json", f"{split}/images.npy", f"{split}/tokens.npy"]:
            if name in links:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                tar.add(data / name, arcname=name)
        for name, body in extra:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def evaluate(run, data, *args, stdin=None, evaluator=ROOT / "engine" / "evaluator.py", **env):
    """The evaluator (of the repository that holds `evaluator`) --evaluate: the split from `data` (a directory), or
    from stdin when stdin is given."""
    p = subprocess.run([sys.executable, "-m", "engine.evaluator", "--evaluate", str(run), "--data",
                        "-" if stdin is not None else str(data), *args], input=stdin or b"", capture_output=True,
                       env={**os.environ, **env}, timeout=300, cwd=evaluator.parent.parent)
    p.out, p.err = p.stdout.decode(), p.stderr.decode()
    p.values = dict(line.split(": ", 1) for line in p.out.splitlines() if ": " in line)
    return p


@pytest.fixture(scope="module")
def honest(tiny_data, tmp_path_factory):
    return trainer(tmp_path_factory.mktemp("honest"), tiny_data)


# ----------------------------------------------------------------------------------------------- end to end

def test_the_split_can_come_from_a_directory_or_from_stdin_alike(honest, tiny_data):
    a = evaluate(honest, tiny_data)
    b = evaluate(honest, tiny_data, stdin=split_tar(tiny_data))
    assert a.returncode == 0 and b.returncode == 0, a.err + b.err
    assert a.values["val_n"] == "100" and 1 <= float(a.values["val_mean_rank"]) <= 100
    assert {k: v for k, v in a.values.items() if k != "eval_seconds"} == \
        {k: v for k, v in b.values.items() if k != "eval_seconds"}
    assert a.values["num_steps"] == "3" and "num_params_m" not in a.values   # a string is never echoed
    assert a.out.count("val_mean_rank") == 1
    t = evaluate(honest, tiny_data, "--split", "test", stdin=split_tar(tiny_data, "test"))
    assert t.returncode == 0 and t.values["test_n"] == "40" and "val_mean_rank" not in t.out, t.err


def test_the_trusted_parent_never_imports_torch(honest, tiny_data):
    # it reads, checks and scores; only the child process, which runs the graphs, has torch
    code = ("import sys; from engine import evaluator; "
            "rc = evaluator.main(['--evaluate', sys.argv[1], '--data', sys.argv[2]]); "
            "assert rc == 0 and 'torch' not in sys.modules, rc")
    p = subprocess.run([sys.executable, "-c", code, str(honest), str(tiny_data)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "val_mean_rank: " in p.stdout, p.stderr


@pytest.mark.parametrize("stream, message", [
    ({"extra": [("val/heatmaps.npy", b"x")]}, "unexpected entry 'val/heatmaps.npy' in the data on stdin"),
    ({"extra": [("meta.json", b"{}")]}, "unexpected entry 'meta.json' in the data on stdin"),
    ({"links": ["val/tokens.npy"]}, "unexpected entry 'val/tokens.npy' in the data on stdin"),
], ids=["extra", "twice", "symlink"])
def test_only_the_expected_plain_files_are_read_from_stdin(honest, tiny_data, stream, message):
    p = evaluate(honest, tiny_data, stdin=split_tar(tiny_data, **stream))
    assert p.returncode == 2 and message in p.err and "mean_rank" not in p.out, p.err


def test_a_missing_file_in_the_stream_is_an_error(honest, tiny_data):
    p = evaluate(honest, tiny_data, "--split", "test", stdin=split_tar(tiny_data))   # holds val, not test
    assert p.returncode == 2 and "unexpected entry 'val/images.npy'" in p.err, p.err
    p = evaluate(honest, tiny_data, stdin=b"")
    assert p.returncode == 2 and "cannot read the data on stdin as a tar stream" in p.err, p.err


# ----------------------------------------------------------------------------------------------- the archive

def entries(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def archive(items, compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in items:
            info = zipfile.ZipInfo("x")
            info.filename, info.compress_type = name, compression   # as is: ZipInfo() cuts a name at a NUL byte
            z.writestr(info, data)
    return buf.getvalue()


def edit_json(items, suffix, edit):
    out = []
    for name, data in items:
        if name.endswith(suffix):
            obj = json.loads(data)
            edit(obj)
            data = json.dumps(obj).encode()
        out.append((name, data))
    return out


def signature(m):
    return m["graph_module"]["module_call_graph"][0]["signature"]


def set_spec(m, node):
    spec = json.loads(signature(m)["in_spec"])
    spec[1]["children_spec"][1] = node
    signature(m)["in_spec"] = json.dumps(spec)


def first_node(m):
    return m["graph_module"]["graph"]["nodes"][0]


def test_torch_gets_a_rebuilt_archive_of_checked_entries_only(honest):
    import torch
    raw = (honest / "image_encoder.pt2").read_bytes()
    rebuilt = checks.check_archive(raw)
    got = dict(entries(io.BytesIO(rebuilt)))
    assert all(n.startswith("archive/") for n in got) and "archive/.data/serialization_id" not in got
    assert got["archive/data/sample_inputs/model.pt"] == b""   # nothing torch would unpickle
    nodes = json.loads(got["archive/models/model.json"])["graph_module"]["graph"]["nodes"]
    assert nodes and all(n["metadata"] == {} for n in nodes)   # no stack traces or module paths
    x = torch.rand(5, 3, 64, 64)
    ours, theirs = torch.export.load(io.BytesIO(rebuilt)).module(), torch.export.load(io.BytesIO(raw)).module()
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("attack, message", [
    ("nul", "has a non-printable character"),
    ("duplicate", "duplicate entry"),
    ("extra", "unexpected entry 'image_encoder/data/evil.py'"),
    ("deflated", "is compressed or encrypted"),
    ("header", "File name in directory"),
    ("json_keys", "duplicate keys"),
    ("pickled_weight", "'p.weight' is not a plain tensor"),
    ("custom_constant", "'c' is not a plain tensor"),
    ("spec_type", "unexpected input/output structure"),
    ("spec_enum", "unexpected input/output structure"),
    ("custom_obj", "the graph uses as_custom_obj"),
    ("string_arg", "with a string argument 'filename'"),
    ("denied_op", "the graph calls 'torch.ops.aten._print.default'"),
    ("plan_cache", "the graph calls 'torch.ops.aten._cufft_get_plan_cache_size.default'"),   # an integer kept
    ("out_overload", "the graph calls 'torch.ops.aten.mean.out'"),                           # writes into `out`
    ("buffer_mutation", "the graph has output_specs of kinds ['buffer_mutation', 'user_output']"),
    ("sympy", "unexpected symbolic expression"),
])
def test_archive_checks(honest, attack, message):
    items = entries(honest / "image_encoder.pt2")
    cfg = "model_weights_config.json"
    compression = zipfile.ZIP_STORED
    if attack == "nul":
        items = [(n + "\0" if n.endswith(cfg) else n, d) for n, d in items]
    elif attack == "duplicate":
        items += [i for i in items if i[0].endswith(cfg)]
    elif attack == "extra":
        items += [("image_encoder/data/evil.py", b"import os")]
    elif attack == "deflated":
        compression = zipfile.ZIP_DEFLATED
    elif attack == "json_keys":
        items = [(n, d.replace(b'{"config": {', b'{"config": {}, "config": {', 1) if n.endswith(cfg) else d)
                 for n, d in items]
    elif attack == "pickled_weight":
        items = edit_json(items, cfg, lambda c: c["config"]["p.weight"].update(use_pickle=True))
    elif attack == "custom_constant":
        items = edit_json(items, "model_constants_config.json", lambda c: c["config"].update(
            c={"path_name": "custom_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": None}))
    elif attack == "spec_type":
        items = edit_json(items, "model.json", lambda m: set_spec(
            m, {"type": "collections.namedtuple", "context": "torch.return_types.max", "children_spec": []}))
    elif attack == "spec_enum":
        items = edit_json(items, "model.json", lambda m: set_spec(m, {
            "type": "builtins.dict", "children_spec": [{"type": None, "context": None, "children_spec": []}],
            "context": json.dumps([{"__enum__": True, "fqn": "ctypes:cdll", "name": "/out/x.so"}])}))
    elif attack == "custom_obj":
        items = edit_json(items, "model.json", lambda m: first_node(m)["inputs"].append(
            {"name": "obj", "arg": {"as_custom_obj": {"name": "obj", "class_fqn": "os.system"}}, "kind": 1}))
    elif attack == "string_arg":
        items = edit_json(items, "model.json", lambda m: first_node(m)["inputs"].append(
            {"name": "filename", "arg": {"as_string": "/data/val/images.npy"}, "kind": 1}))
    elif attack in ("denied_op", "plan_cache", "out_overload"):
        op = {"denied_op": "_print.default", "plan_cache": "_cufft_get_plan_cache_size.default",
              "out_overload": "mean.out"}[attack]
        items = edit_json(items, "model.json", lambda m: first_node(m).update(target="torch.ops.aten." + op))
    elif attack == "buffer_mutation":
        items = edit_json(items, "model.json", lambda m: m["graph_module"]["signature"]["output_specs"].append(
            {"buffer_mutation": {"arg": {"name": "x"}, "buffer_name": "b"}}))
    elif attack == "sympy":
        items = edit_json(items, "model.json", lambda m: m["graph_module"]["graph"]["sym_int_values"].update(
            x={"as_expr": {"expr_str": "__import__('os').system('id')", "hint": None}}))
    raw = archive(items, compression)
    if attack == "header":   # the local header names another file than the central directory does
        name = next(n for n, _ in items if n.endswith(cfg)).encode()
        i = raw.index(name)
        raw = raw[:i] + name.replace(b"weights_config", b"weights_confiG") + raw[i + len(name):]
    with pytest.raises(ev.Refused, match=None) as e:
        checks.check_archive(raw)
    assert message in str(e.value)
    checks.check_archive(archive(entries(honest / "image_encoder.pt2")))   # control: the untouched entries pass


@pytest.mark.parametrize("expr, message", [
    ("x + torch.empty(x.shape[1])", "'torch.ops.aten.empty.memory_format'"),
    ("x + torch.empty_like(x)", "'torch.ops.aten.empty_like.default'"),
    ("x + x.new_empty(x.shape)", "'torch.ops.aten.new_empty.default'"),
    ("x + torch.empty_strided(x.shape, (x.shape[1], 1))", "'torch.ops.aten.empty_strided.default'"),
    ("x + torch.rand(x.shape)", "'torch.ops.aten.rand.default'"),
    ("torch.bernoulli(x.sigmoid())", "'torch.ops.aten.bernoulli.default'"),
    ("x.clone().add_(1)", "'torch.ops.aten.add_.Tensor': only side-effect-free aten ops are allowed; save "
                          "ep.run_decompositions({}), which rewrites in-place ops"),
    ("torch.nn.functional.dropout(x, 0.5, training=True)", "dropout.default with train=True: it must be off"),
    ("torch.nn.functional.scaled_dot_product_attention(*[x[:, None, None]] * 3, dropout_p=0.3)[:, 0, 0]",
     "scaled_dot_product_attention.default with dropout_p=0.3: it must be off"),
], ids=["empty", "empty_like", "new_empty", "empty_strided", "rand", "bernoulli", "in_place", "dropout", "attention"])
def test_graphs_may_only_call_allowlisted_ops_with_randomness_off(expr, message):
    # Uninitialised memory (sometimes the previous call's values) and random draws would carry information from one
    # call to the next; export writes each of these. Refused by the archive check and again by check_graphs (the
    # child's check of the graph torch loaded).
    import torch
    f = eval("lambda x: " + expr, {"torch": torch})

    class M(torch.nn.Module):
        def forward(s, x):
            return f(x)
    ep = torch.export.export(M(), (torch.rand(2, 8),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    for check in (lambda: checks.check_archive(buf.getvalue()), lambda: checks.check_graphs(ep)):
        with pytest.raises(ev.Refused) as e:
            check()
        assert message in str(e.value)


def test_a_flag_moved_into_place_by_position_is_refused_after_loading():
    # torch binds positional inputs in schema order, skipping absent ones: a value named is_causal after attn_mask
    # lands in dropout_p. The archive check reads names; check_graphs reads what the call will get.
    import torch

    class Attention(torch.nn.Module):
        def forward(s, x):
            return torch.nn.functional.scaled_dot_product_attention(*[x[:, None, None]] * 3)[:, 0, 0]

    def shift(m):
        node = next(n for n in m["graph_module"]["graph"]["nodes"] if "scaled_dot" in n["target"])
        node["inputs"] += [{"name": "attn_mask", "arg": {"as_none": True}, "kind": 1},
                           {"name": "is_causal", "arg": {"as_float": 0.5}, "kind": 1}]
    ep = torch.export.export(Attention(), (torch.rand(2, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    raw = archive(edit_json(entries(buf), "model.json", shift))
    rebuilt = checks.check_archive(raw)
    with pytest.raises(ev.Refused, match="scaled_dot_product_attention.default with dropout_p=0.5: it must be off"):
        checks.check_graphs(torch.export.load(io.BytesIO(rebuilt)))


def test_the_allowlist_agrees_with_torchs_own_view_of_each_op():
    # Every allowlisted op exists; none draws random numbers but through a FLAGS argument, off by default; and the
    # overloads refused by name all write into an argument (those that write under other names, check_graphs
    # refuses by their schema).
    import torch
    for name in checks.ALLOWED_ATEN:
        packet = getattr(torch.ops.aten, name)
        for overload in packet.overloads():
            op = getattr(packet, overload)
            assert op._schema.is_mutable or not checks.OUT_OVERLOAD.fullmatch(overload), op
            if torch.Tag.nondeterministic_seeded in op.tags and not op._schema.is_mutable:
                flag = {a.name: a for a in op._schema.arguments}[checks.FLAGS[name]]
                assert not flag.has_default_value() or flag.default_value in (0, False), op


# ----------------------------------------------------------------------------------------------- the hand-off

def test_hand_off_files_are_plain_files_of_bounded_size(tmp_path):
    assert ev.read_handoff(tmp_path, "train_stats.json") is None
    (tmp_path / "train_stats.json").write_text("{}")
    assert ev.read_handoff(tmp_path, "train_stats.json") == b"{}"
    (tmp_path / "train_stats.json").unlink()
    os.mkfifo(tmp_path / "train_stats.json")   # opening it for reading would block
    with pytest.raises(ev.Refused, match="train_stats.json in the run directory is not a regular file"):
        ev.read_handoff(tmp_path, "train_stats.json")
    (tmp_path / "image_encoder.pt2").mkdir()
    with pytest.raises(ev.Refused, match="image_encoder.pt2 in the run directory is not a regular file"):
        ev.read_handoff(tmp_path, "image_encoder.pt2")
    (tmp_path / "text_encoder.pt2").symlink_to("/dev/zero")
    with pytest.raises(ev.Refused, match=r"cannot open text_encoder.pt2 in the run directory \(Too many levels"):
        ev.read_handoff(tmp_path, "text_encoder.pt2")
    (tmp_path / "train_stats.json").unlink()
    with open(tmp_path / "train_stats.json", "wb") as f:
        f.truncate(ev.MAX_STATS_BYTES + 1)   # sparse: costs nothing
    with pytest.raises(ev.Refused, match="train_stats.json is 65537 bytes, more than the 65536 allowed"):
        ev.read_handoff(tmp_path, "train_stats.json")


# ----------------------------------------------------------------------------------------------- the child

POSITION = '''
class PosImg(torch.nn.Module):
    def forward(s, images):
        return torch.nn.functional.one_hot(torch.arange(images.shape[0]) % 512, 512).float() + 0 * images.sum()
class PosTxt(torch.nn.Module):
    def forward(s, input_ids, attention_mask):
        return torch.nn.functional.one_hot(torch.arange(input_ids.shape[0]) % 512, 512).float() + 0 * input_ids.sum()
img, txt = PosImg(), PosTxt()
'''


def test_batch_position_cheat_is_refused_and_defeated_by_the_secret_orders(tiny_data, tmp_path):
    run = trainer(tmp_path / "run", tiny_data, POSITION)
    p = evaluate(run, tiny_data)
    assert p.returncode == 1 and "image_encoder.pt2 gives a different output for the same input in another " \
                                 "batch" in p.err and "mean_rank" not in p.out, p.err
    # Without the batch check the cheat runs: sharing the image and caption orders it would score 1.0; with
    # independent secret orders only the fixed points of a random permutation match: mean rank ~ n - 1.
    copy_into(tmp_path / "weak", ["engine", "prepare_data.py"])
    weak = tmp_path / "weak" / "engine" / "evaluator.py"
    check = "    changed = np.unique(order[drift > BATCH_TOLERANCE])\n"
    assert check in weak.read_text()
    weak.write_text(weak.read_text().replace(check, "    changed = []\n"))
    p = evaluate(run, tiny_data, evaluator=weak)
    assert p.returncode == 0 and float(p.values["val_mean_rank"]) > 50.5, p.err   # chance is 50.5


BATCH_MEAN = '''
class Centred(Img):
    def forward(s, images):
        e = super().forward(images)
        return e - e.mean(0, keepdim=True)
img, txt = Centred(), Txt()
'''
STATEFUL = '''
class Remembering(Img):   # in-place ops are refused by name; instance_norm updates running statistics unannounced
    def __init__(s):
        super().__init__()
        s.register_buffer("seen", torch.zeros(8))
        s.register_buffer("var", torch.ones(8))
    def forward(s, images):
        e = super().forward(images)
        torch.nn.functional.instance_norm(e.unsqueeze(-1).expand(-1, -1, 2), s.seen, s.var, use_input_stats=True)
        return e - s.seen
img, txt = Remembering(), Txt()
'''
WIDE = f'''
class W(Img):
    def forward(s, images): return super().forward(images).repeat(1, {ev.MAX_DIM // 8 + 1})
img, txt = W(), Txt()
'''
SLOW = '''
class Slow(Img):
    def forward(s, images):
        x = images.flatten(1)[:, :1].expand(-1, 4096)
        for _ in range(200):
            x = x @ torch.ones(4096, 4096) / 4096
        return super().forward(images) + x[:, :8]
img, txt = Slow(), Txt()
'''


@pytest.mark.parametrize("code, env, message", [
    (BATCH_MEAN, {}, "image_encoder.pt2 gives a different output for the same input in another batch"),
    (STATEFUL, {}, "image_encoder.pt2 failed on the evaluation data: the graph changed its own weights, buffers"),
    (WIDE, {}, f"image_encoder.pt2 failed on the evaluation data: it returned (50, {ev.MAX_DIM + 8})"),
    (SLOW, {"AUTORESEARCH_EVAL_TIMEOUT": "10"}, "took too long (AUTORESEARCH_EVAL_TIMEOUT)"),
], ids=["batch_mean", "stateful", "wide", "slow"])
def test_the_child_is_held_to_stateless_per_row_bounded_output_and_a_time_limit(tiny_data, tmp_path, code, env, message):
    run = trainer(tmp_path / "run", tiny_data, code)
    p = evaluate(run, tiny_data, **env)
    assert p.returncode == (124 if code == SLOW else 1) and message in p.err and "mean_rank" not in p.out, p.err


# ----------------------------------------------------------------------------------------------- the project

TEMPLATE = (ROOT / "prepare_data.py").read_text()


def declarations(tmp_path, old, new):
    path = tmp_path / "prepare_data.py"
    assert old in TEMPLATE
    path.write_text(TEMPLATE.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, message", [
    ('METRIC = "mean_rank"\n', "", "has no valid literal for it: write METRIC once, as a literal on its own line"),
    ('METRIC = "mean_rank"\n', 'METRIC = "Mean rank"\n', 'METRIC = "accuracy"  (lowercase'),
    ('METRIC = "mean_rank"\n', 'METRIC = "mean_rank"\nMETRIC = "r1"\n', "declares it more than once: write METRIC"),
    ('DIRECTION = "minimize"\n', 'DIRECTION = "lower"\n', 'DIRECTION = "maximize"  (or "minimize")'),
    ('PROGRAMS = ["image_encoder.pt2", ', 'PROGRAMS = ["../x.pt2", ', "PROGRAMS = ["),
    ('EVAL_FILES = ["images.npy", ', 'EVAL_FILES = [f"{1}.npy", ', "EVAL_FILES = ["),   # not a literal
], ids=["missing", "name", "twice", "direction", "path", "computed"])
def test_the_project_declares_what_is_scored_in_literals(tmp_path, old, new, message):
    with pytest.raises(ev.SetupError) as e:
        ev.project_constants(declarations(tmp_path, old, new))
    assert message in str(e.value)
    assert ev.project_constants(ROOT / "prepare_data.py") == {   # control: the template's
        "METRIC": "mean_rank", "DIRECTION": "minimize", "PROGRAMS": ["image_encoder.pt2", "text_encoder.pt2"],
        "EVAL_FILES": ["images.npy", "tokens.npy"]}


def test_run_sh_gets_the_hand_off_and_split_names_from_the_engine():
    p = subprocess.run([sys.executable, "-m", "engine.evaluator", "--names", "test"], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 0 and p.stdout == "image_encoder.pt2 text_encoder.pt2\n" \
                                             "meta.json test/images.npy test/tokens.npy\n", p.stderr


def project(tmp_path, score_body):
    """An engine copy next to the template's prepare_data.py, whose score() is wrapped by `score_body`."""
    d = tmp_path / "project"
    copy_into(d, ["engine"])
    (d / "prepare_data.py").write_text(TEMPLATE + "\n_score = score\n\n\ndef score(encode, split):\n" + score_body)
    return d / "engine" / "evaluator.py"


@pytest.mark.parametrize("result, error, message", [
    ({"r1": 1.0}, ev.SetupError, "score() must return a dict {name: number} that holds METRIC 'mean_rank'"),
    ({"mean_rank": "best"}, ev.SetupError, "score() must return a dict {name: number}"),
    ({"mean_rank": True}, ev.SetupError, "score() must return a dict {name: number}"),
    ({"mean_rank": 1.0, "Bad key": 2}, ev.SetupError, "score() must return a dict {name: number}"),
    ({"mean_rank": float("nan")}, ev.Refused, "score() gave non-finite values for ['mean_rank']"),
])
def test_what_score_must_return(result, error, message):
    with pytest.raises(error) as e:
        ev.trusted_lines(result, "mean_rank", "val")
    assert message in str(e.value)
    # control: METRIC first, whatever the order score() returns; integers as integers
    assert ev.trusted_lines({"n": 3, "r1": np.float32(0.5), "mean_rank": np.float64(2.25)}, "mean_rank", "test") == \
        ["test_mean_rank: 2.25", "test_n: 3", "test_r1: 0.5"]


@pytest.mark.parametrize("body, rc, message", [
    ("    return {'r1': 1.0}\n", 2, "score() must return a dict {name: number} that holds METRIC 'mean_rank'"),
    ("    encode('model.pt2', split['tokens'])\n", 2, "score() ran 'model.pt2', which is not in PROGRAMS"),
    ("    encode('text_encoder.pt2', split['tokens'].astype(object))\n", 2, "score() must give text_encoder.pt2 numeric"),
    ("    raise KeyError('labels')\n", 1, "score() in prepare_data.py failed (KeyError: 'labels')"),
], ids=["no_metric", "unknown_program", "object_array", "raises"])
def test_what_score_may_ask_and_how_it_fails(honest, tiny_data, tmp_path, body, rc, message):
    p = evaluate(honest, tiny_data, evaluator=project(tmp_path, body))
    assert p.returncode == rc and message in p.err and "val_" not in p.out, p.err


def test_a_refusal_sticks_even_when_score_catches_it(tiny_data, tmp_path):
    run = trainer(tmp_path / "run", tiny_data, BATCH_MEAN)
    body = ("    try:\n        return _score(encode, split)\n    except Exception:\n        pass\n"
            "    return {'mean_rank': 1.0}\n")
    p = evaluate(run, tiny_data, evaluator=project(tmp_path, body))
    assert p.returncode == 1 and "gives a different output for the same input in another batch" in p.err, p.err
    assert "val_mean_rank" not in p.out
