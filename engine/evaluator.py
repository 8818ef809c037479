"""The trusted evaluation engine of autoresearch: it scores what train.py handed off. A fork keeps this file as is.

    python -m engine.evaluator --evaluate RUN_DIR [--split val|test] [--data DIR|-]   score a hand-off (run.sh runs
                                                                                     this in the evaluation container)
    python -m engine.evaluator --names val|test    the files train.py hands off, then the split's files (for run.sh)

The project, the repository's prepare_data.py, says what to score and how (README: Fork it). It declares four
literals, read here without importing it, and one function:

    METRIC = "mean_rank"                                 printed first as val_mean_rank (test_... for --split test)
    DIRECTION = "minimize"                               or "maximize"; the harness keeps what improves it
    PROGRAMS = ["image_encoder.pt2", "text_encoder.pt2"] the torch.export archives train.py must hand off
    EVAL_FILES = ["images.npy", "tokens.npy"]            the arrays of DATA/<split>/ that score() reads
    def score(encode, split): ... return {"mean_rank": ..., ...}

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
import zipfile
from pathlib import Path

import numpy as np

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


class Refused(Exception):
    """The hand-off is refused (exit 1): the candidate's fault."""


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


# ----------------------------------------------------------------------------------------------- the archives
# What torch.export.save writes for one plain nn.Module, and nothing else: torch.export.load() would unpickle
# (weights_only=False) weights or constants marked "use_pickle", custom/opaque objects, old-format files and
# sample inputs, so none of those ever reach it.
ARCHIVE_ENTRIES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                             r"|models/model\.json|data/sample_inputs/model\.pt"
                             r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                             r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+)")
ARCHIVE_HEADER = {"archive_format": rb"pt2", "archive_version": rb"\d+", "byteorder": rb"little|big",
                  ".data/version": rb"\d+\n?"}
FQN = re.compile(r"\w[\w.]*")  # weight and graph names (nn.Sequential's start with a digit); they end up in
                                # generated Python code, so never a quote, bracket or operator
# Graph ops: the aten ops below (any overload that returns new tensors), plus the plumbing export emits. Each is a
# function of its arguments alone. Left out on purpose: anything that can read memory nobody wrote (empty*,
# new_empty*, empty_strided, resize*, set, as_strided, _reshape_alias, _unsafe_index*), keeps state across calls
# (the cuFFT plan cache ops) or draws random numbers (rand*, bernoulli, normal, native_dropout, multinomial: a number
# of draws that depends on the data carries it to the next call), I/O and printing, in-place ops (names ending in
# "_") and out= overloads, which write into a tensor they are given.
ALLOWED_ATEN = {
    # elementwise math: each output element is a fixed function of the input elements at its index
    *"""abs absolute acos acosh add addcdiv addcmul angle arccos arccosh arcsin arcsinh arctan arctan2 arctanh asin
    asinh atan atan2 atanh bitwise_and bitwise_left_shift bitwise_not bitwise_or bitwise_right_shift bitwise_xor
    ceil clamp clamp_max clamp_min clip copysign cos cosh deg2rad digamma div divide erf erfc erfinv exp exp2 expm1
    fix float_power floor floor_divide fmax fmin fmod frac frexp gcd heaviside hypot i0 igamma igammac lcm ldexp
    lerp lgamma log log10 log1p log2 logaddexp logaddexp2 logit maximum minimum mul multiply mvlgamma nan_to_num neg
    negative nextafter polygamma positive pow rad2deg reciprocal remainder round rsqrt rsub sgn sigmoid sign signbit
    sin sinc sinh sqrt square sub subtract tan tanh true_divide trunc xlogy special_entr special_erfcx special_expit
    special_i0e special_i1 special_i1e special_log_ndtr special_ndtr special_ndtri special_xlog1py
    special_zeta""".split(),
    # comparisons, logic and selection by a condition
    *"""eq ne lt le gt ge greater greater_equal less less_equal not_equal __and__ __or__ __xor__ __lshift__
    __rshift__ logical_and logical_not logical_or logical_xor isfinite isinf isnan isneginf isposinf isreal isclose
    isin where masked_fill bucketize searchsorted""".split(),
    # reductions, scans and sorts along dimensions of the input
    *"""all any amax amin aminmax argmax argmin count_nonzero cummax cummin cumprod cumsum logcumsumexp logsumexp
    max mean median min mode nanmean nanmedian nansum norm prod quantile nanquantile std std_mean sum var var_mean
    linalg_vector_norm linalg_matrix_norm linalg_norm frobenius_norm dist diff trace sort argsort msort topk
    kthvalue unique_consecutive unique_dim _unique2 bincount histc cov corrcoef sum_to_size""".split(),
    # shapes, views, copies and indexing: they move or pick elements, and check sizes and indices against the input
    *"""alias broadcast_tensors broadcast_to cat concat concatenate chunk clone contiguous detach diag diag_embed
    diagflat diagonal diagonal_scatter dsplit dstack expand expand_as flatten flip fliplr flipud gather hsplit
    hstack index index_add index_copy index_fill index_put index_reduce index_select masked_scatter masked_select
    movedim moveaxis narrow nonzero nonzero_static nonzero_numpy argwhere permute ravel repeat repeat_interleave
    reshape reshape_as roll rot90 scatter scatter_add scatter_reduce select select_scatter slice slice_scatter split
    split_with_sizes squeeze stack swapaxes swapdims t numpy_T mT mH matrix_H adjoint take take_along_dim
    tensor_split tile transpose tril triu unbind unflatten unfold unsqueeze view view_as vsplit vstack column_stack
    row_stack atleast_1d atleast_2d atleast_3d block_diag cartesian_prod combinations meshgrid kron one_hot pad
    constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d _pad_circular _pad_enum pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
    _unsafe_view lift_fresh lift_fresh_copy alias_copy detach_copy expand_copy permute_copy select_copy slice_copy
    split_copy split_with_sizes_copy squeeze_copy t_copy transpose_copy unbind_copy unfold_copy unsqueeze_copy
    view_copy""".split(),
    # sizes and checks: integers about shapes, a tensor's value as a number, asserts that can only stop a call
    *"""sym_size sym_stride sym_numel sym_storage_offset _local_scalar_dense item _assert_scalar _assert_async
    _assert_tensor_metadata sym_constrain_range sym_constrain_range_for_size""".split(),
    # matrix products and linear algebra
    *"""addbmm addmm addmv addr baddbmm bmm dot einsum inner linear matmul mm mv outer ger tensordot vdot
    chain_matmul linalg_multi_dot bilinear cross linalg_cross linalg_vecdot cdist _cdist_forward pdist
    _euclidean_dist cosine_similarity pairwise_distance det logdet slogdet inverse pinverse linalg_det
    linalg_slogdet linalg_inv linalg_inv_ex linalg_solve linalg_solve_ex linalg_cholesky linalg_cholesky_ex
    linalg_eigh linalg_eigvalsh linalg_qr linalg_svd linalg_svdvals linalg_pinv linalg_matrix_exp
    linalg_matrix_power linalg_solve_triangular _linalg_check_errors _linalg_det _linalg_slogdet _linalg_eigh
    _linalg_svd _linalg_solve_ex""".split(),
    # convolution, pooling, resampling and Fourier transforms of a grid
    *"""conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution avg_pool1d avg_pool2d
    avg_pool3d max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d
    _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d
    upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d
    _upsample_bilinear2d_aa _upsample_bicubic2d_aa grid_sampler grid_sampler_2d grid_sampler_3d
    affine_grid_generator im2col col2im fft_fft fft_ifft fft_rfft fft_irfft fft_fft2 fft_ifft2 fft_rfft2 fft_irfft2
    fft_fftn fft_ifftn fft_rfftn fft_irfftn fft_hfft fft_ihfft fft_fftshift fft_ifftshift""".split(),
    # normalization, by given statistics or by those of each row's own elements (batch_norm: see FLAGS)
    *"""layer_norm native_layer_norm group_norm native_group_norm rms_norm _fused_rms_norm instance_norm batch_norm
    _native_batch_norm_legit_no_training _weight_norm _weight_norm_interface norm_except_dim""".split(),
    # activations, softmax, attention, embeddings, recurrent layers (dropout and attention: see FLAGS)
    *"""relu relu6 gelu silu mish elu selu celu glu hardtanh hardsigmoid hardswish hardshrink softshrink leaky_relu
    prelu _prelu_kernel softplus log_sigmoid log_sigmoid_forward threshold softmax log_softmax _softmax _log_softmax
    _safe_softmax _masked_softmax special_softmax special_log_softmax scaled_dot_product_attention
    _scaled_dot_product_attention_math _scaled_dot_product_flash_attention
    _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
    _scaled_dot_product_cudnn_attention _scaled_dot_product_fused_attention_overrideable
    _native_multi_head_attention _transformer_encoder_layer_fwd embedding lstm gru rnn_tanh rnn_relu lstm_cell
    gru_cell rnn_tanh_cell rnn_relu_cell dropout feature_dropout alpha_dropout feature_alpha_dropout""".split(),
    # new tensors, every element defined by the arguments
    *"""zeros ones full arange range scalar_tensor eye linspace logspace zeros_like ones_like full_like new_zeros
    new_ones new_full fill zero tril_indices triu_indices fft_fftfreq fft_rfftfreq hann_window hamming_window
    blackman_window bartlett_window kaiser_window""".split(),
    # the same values in another dtype, device or (complex) representation
    *"""to _to_copy type_as copy _autocast_to_reduced_precision _autocast_to_full_precision view_as_real
    view_as_complex complex polar real imag conj _conj resolve_conj resolve_neg conj_physical""".split(),
}
# add.out, sum.IntList_out, xlogy.OutTensor write into a tensor they are given (check_graphs also refuses the rest
# of the overloads that write, such as sort.values, by their schema)
OUT_OVERLOAD = re.compile(r"out\w*|\w*_out|Out\w*")
# Arguments that must be a literal False or 0, as export writes them in eval mode: on, they draw random numbers (the
# child's generator is state kept across calls) or update running statistics in place (batch_norm). Absent means the
# schema's default, which is off.
FLAGS = {**dict.fromkeys(["dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "lstm", "gru",
                          "rnn_tanh", "rnn_relu"], "train"), "batch_norm": "training",
         **dict.fromkeys(["scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                          "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                          "_scaled_dot_product_fused_attention_overrideable"], "dropout_p")}
# String arguments: only these harmless options (no file names).
STR_ARGS = {"approximate", "rounding_mode", "equation", "reduce", "side", "mode", "padding", "padding_mode",
            "interpolation_mode", "interpolation", "norm", "ord", "indexing", "assert_msg", "msg", "UPLO", "driver"}
OTHER_OPS = {"_operator." + n for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg",
                                        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
OTHER_OPS |= {"torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_float", "torch.sym_int", "torch._assert",
              "torch.ops.higher_order.wrap_with_set_grad_enabled", "torch.ops.higher_order.wrap_with_autocast"}
# Custom objects, operators as values and namedtuple types: torch looks each up by name.
BY_NAME = {"as_custom_obj", "as_operator", "custom_obj_values", "treespec_namedtuple_fields"}
# A plain program reads parameters, buffers and constants and returns outputs: no effect tokens, no mutated
# state carried from one batch to the next, no custom objects.
INPUT_SPECS = {"user_input", "parameter", "buffer", "tensor_constant", "constant_input"}
OUTPUT_SPECS = {"user_output"}
# Symbolic shapes are parsed with sympy.sympify (an eval) and guards become Python code: plain arithmetic only.
SYMPY_NAMES = {"Symbol", "Integer", "Rational", "Float", "True", "False", "positive", "integer", "real",
               "nonnegative", "finite", "Max", "Min", "Mul", "Add", "Pow", "Mod", "Abs", "floor", "ceiling", "Eq",
               "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "oo", "FloorDiv", "CleanDiv", "CeilDiv",
               "ModularIndexing", "PythonMod", "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "ToFloat",
               "IntTrueDiv", "FloatTrueDiv", "PowByNatural", "FloatPow", "Where"}
SYMBOL = r"[a-z]+\d+"
GUARD_TERM = re.compile(r"L\['[A-Za-z_]\w*'\](\.(size|stride)\(\)\[\d+\])?")


def _check_op(name, args=()):
    """Raises Refused unless name is an allowed graph op ('torch.ops.aten.<op>.<overload>' or OTHER_OPS) and its
    arguments, (name, value) pairs, are allowed: strings only for harmless options, FLAGS off. The archive check
    reads the arguments by name as serialized, check_graphs as torch will pass them."""
    m = re.fullmatch(r"torch\.ops\.aten\.(\w+)\.(\w+)", name)
    if name not in OTHER_OPS and not (m and m[1] in ALLOWED_ATEN and not OUT_OVERLOAD.fullmatch(m[2])):
        inplace = m and m[1][:-1] in ALLOWED_ATEN and m[1].endswith("_")   # export keeps x += y, ReLU(inplace=True)
        raise Refused(f"the graph calls {name[:80]!r}: only side-effect-free aten ops are allowed" + (
            "; save ep.run_decompositions({}), which rewrites in-place ops" if inplace else ""))
    for arg, value in args:
        if (isinstance(value, str) or isinstance(value, list) and any(isinstance(v, str) for v in value)) \
                and arg not in STR_ARGS:
            raise Refused(f"the graph calls {name} with a string argument {str(arg)[:40]!r}, which is not allowed")
        if m and FLAGS.get(m[1]) == arg and not (type(value) in (bool, int, float) and value == 0):
            raise Refused(f"the graph calls {name} with {arg}={str(value)[:40]}: it must be off (False or 0, as "
                          "export writes it in eval mode); on, it draws random numbers or updates running statistics")


def _json_args(inputs):
    """A serialized node's inputs as (name, value) pairs for _check_op: literals as the values torch passes, strings
    wherever the argument holds one, anything else as is."""
    out = []
    for a in inputs:
        arg = a.get("arg") if isinstance(a, dict) else None
        if isinstance(arg, dict) and {"as_string", "as_strings"} & set(arg):
            value = str(arg.get("as_string", arg.get("as_strings")))
        elif isinstance(arg, dict) and len(arg) == 1 and next(iter(arg)) in ("as_bool", "as_int", "as_float"):
            value = next(iter(arg.values()))
        else:
            value = arg
        out.append((a.get("name") if isinstance(a, dict) else None, value))
    return out


def _check_expr(s):
    if not re.fullmatch(r"[\w\s+\-*/%(),.<>=!']*", s) or "__" in s:
        raise Refused(f"unexpected symbolic expression {s[:80]!r}")
    rest = re.sub(rf"'{SYMBOL}'", "", s)  # quoted symbol names are the only strings allowed
    names = re.findall(r"[A-Za-z_]\w*", rest)
    if "'" in rest or any(n not in SYMPY_NAMES and not re.fullmatch(SYMBOL, n) for n in names):
        raise Refused(f"unexpected symbolic expression {s[:80]!r}")


def _check_guard(s):
    rest = GUARD_TERM.sub("0", s)
    if not re.fullmatch(r"[\w\s+\-*/%()<>=!]*", rest) or any(
            n not in ("and", "or", "not") for n in re.findall(r"[A-Za-z_]\w*", rest)):
        raise Refused(f"unexpected guard {s[:80]!r}")


def _check_spec(s):
    """A pytree spec as torch.export.save writes it for an encoder: tensors in tuples, lists and dicts with plain
    keys. torch imports any other type, and enum values in a dict's keys, by name (a ctypes library loader, say)."""
    def node(t):
        ok = isinstance(t, dict) and set(t) == {"type", "context", "children_spec"} and isinstance(
            t["children_spec"], list)
        typ, ctx, kids = (t["type"], t["context"], t["children_spec"]) if ok else (None, None, None)
        if not ok:
            pass
        elif typ is None:
            ok = ctx is None and not kids
        elif typ in ("builtins.tuple", "builtins.list"):
            ok = ctx == "null"
        elif typ == "builtins.dict":
            keys = _strict_json(ctx) if isinstance(ctx, str) else None
            ok = isinstance(keys, list) and len(keys) == len(kids) and all(
                isinstance(k, str) and FQN.fullmatch(k) for k in keys)
        else:
            ok = False
        if not ok:
            raise Refused(f"unexpected input/output structure {json.dumps(t)[:100]}: only tensors in tuples, "
                            "lists and dicts with plain string keys are allowed")
        for k in kids:
            node(k)

    spec = _strict_json(s) if isinstance(s, str) else None
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1):
        raise Refused(f"unexpected pytree spec {str(s)[:80]!r}")
    node(spec[1])


def _check_program(o, key=""):
    """Walks the serialized program: node targets, symbolic expressions, guards, specs and names must all be plain.
    Node metadata (stack traces, module paths) is dropped: it only informs, and torch imports or compiles some of
    it."""
    if isinstance(o, dict):
        if "target" in o and "inputs" in o:  # a graph node, at any depth (subgraphs included)
            _check_op(str(o["target"]), _json_args(o["inputs"] if isinstance(o["inputs"], list) else []))
        for k, v in o.items():
            if not FQN.fullmatch(k):
                raise Refused(f"unexpected name {k[:60]!r} in the graph")
            if k == "metadata":
                o[k] = {}
            elif k in BY_NAME and v:
                raise Refused(f"the graph uses {k}: only tensors and plain values are allowed")
            elif k in ("input_specs", "output_specs") and not all(
                    isinstance(spec, dict) and set(spec) <= (INPUT_SPECS if k == "input_specs" else OUTPUT_SPECS)
                    for spec in v):
                raise Refused(f"the graph has {k} of kinds {sorted({s for d in v for s in d})}: only plain inputs, "
                                "parameters, buffers and constants in, outputs out (no state carried between calls)")
            elif k == "expr_str":
                _check_expr(str(v))
            elif k == "guards_code":
                for g in v:
                    _check_guard(str(g))
            elif k in ("in_spec", "out_spec"):
                _check_spec(v)
            else:
                _check_program(v, k)
    elif isinstance(o, list):
        for v in o:
            _check_program(v, key)
    elif isinstance(o, str):
        ok = FQN.fullmatch(o) or o == "" or (key == "as_string" and re.fullmatch(r"[\w ,.\->]*", o)) or (
            key == "torch_version" and re.fullmatch(r"[\w.+]*", o))
        if not ok:
            raise Refused(f"unexpected string {o[:60]!r} in the graph ({key})")


def _strict_json(b):
    """JSON with unique keys, so that what we check is what torch reads (its parser keeps the last duplicate)."""
    def unique(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise Refused(f"duplicate keys in {[k for k, _ in pairs][:8]} in the archive's JSON")
        return dict(pairs)
    return json.loads(b, object_pairs_hook=unique)


def _zip_entries(raw):
    """{name below the archive's root folder: bytes} of what train.py wrote, each entry checked as it is read."""
    z = zipfile.ZipFile(io.BytesIO(raw))
    infos = z.infolist()
    root = infos[0].orig_filename.split("/", 1)[0] + "/" if infos else ""
    entries = {}
    for info in infos:
        name = info.orig_filename  # zipfile's .filename stops at a NUL byte; torch reads the whole name
        if not (name.isascii() and name.isprintable()):
            raise Refused(f"entry name {name[:80]!r} has a non-printable character")
        rel = name[len(root):]
        if rel in entries:
            raise Refused(f"duplicate entry {name[:80]!r}")
        if not name.startswith(root) or not ARCHIVE_ENTRIES.fullmatch(rel):
            raise Refused(f"unexpected entry {name[:80]!r}: only what torch.export.save writes is allowed")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise Refused(f"entry {name[:80]!r} is compressed or encrypted; torch.export.save stores entries")
        entries[rel] = z.read(info)  # checks the local header's name against the central directory's
    if entries.get("archive_format") != b"pt2" or "models/model.json" not in entries:
        raise Refused("not a torch.export archive (save it with torch.export.save)")
    return entries


def _checked_entries(entries):
    """The entries torch will read, each checked or rewritten from what was parsed."""
    out = {}
    for name, pattern in ARCHIVE_HEADER.items():
        if not re.fullmatch(pattern, entries[name]):
            raise Refused(f"unexpected {name} {entries[name][:20]!r}")
        out[name] = entries[name]
    for cfg, folder, prefix in (("data/weights/model_weights_config.json", "data/weights/", "weight_"),
                                ("data/constants/model_constants_config.json", "data/constants/", "tensor_")):
        config = _strict_json(entries[cfg])
        if set(config) != {"config"}:
            raise Refused(f"unexpected keys {sorted(config)[:5]} in {cfg}")
        for fqn, pm in config["config"].items():
            if pm.get("use_pickle") is not False or not pm.get("tensor_meta") or not FQN.fullmatch(fqn) \
                    or not re.fullmatch(prefix + r"\d+", str(pm.get("path_name"))):
                raise Refused(f"{fqn[:60]!r} is not a plain tensor (pickled or custom objects are refused)")
            _check_program(pm)
            out[folder + pm["path_name"]] = entries[folder + pm["path_name"]]
        out[cfg] = json.dumps(config).encode()
    program = _strict_json(entries["models/model.json"])
    _check_program(program)
    out["models/model.json"] = json.dumps(program).encode()
    out["data/sample_inputs/model.pt"] = b""  # read as "no sample inputs": nothing for torch to unpickle
    return out


def check_archive(raw):
    """The archive torch will load, rebuilt in memory from the checked entries of `raw` (what train.py wrote),
    else Refused. Only what torch.export.save writes for a plain nn.Module: plain, unique entry names, raw
    tensors only (nothing torch would unpickle), unique-key JSON, safe graph ops and plain specs. torch never
    reads `raw` itself, so where two zip readers disagree (NUL bytes in names, duplicate names, a local header
    that differs from the central directory) only the checked reading counts."""
    try:
        out = _checked_entries(_zip_entries(raw))
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise Refused(f"not a torch.export archive ({type(e).__name__}: {str(e)[:200]})")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as w:
        for name, data in out.items():
            w.writestr("archive/" + name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the hand-off

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
    """The informational numbers of train_stats.json, keeping only real finite numbers (never echo strings)."""
    try:
        stats = json.loads(data)
    except (TypeError, ValueError):
        notes.append(f"note: no readable {STATS} in the run directory")
        return {}
    out = {}
    for k in STAT_KEYS:
        v = stats.get(k) if isinstance(stats, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
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


def _op_name(target):
    """'torch.ops.aten.add.Tensor' style name of a graph node target (an OpOverload, a HOP or a function)."""
    import torch
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._overloadpacket.__name__}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.name()}"
    if callable(target) and getattr(target, "__module__", None) in ("_operator", "operator"):
        return f"_operator.{target.__name__}"
    if callable(target) and getattr(torch, getattr(target, "__name__", ""), None) is target:
        return f"torch.{target.__name__}"
    return repr(target)


def check_graphs(ep):
    """After loading, the graph as torch sees it (all submodules) must pass the same rule, on the arguments each call
    will get; and torch's own view of each op must agree: nothing that writes into an argument or draws random
    numbers (but FLAGS, checked off)."""
    import torch
    for gm in ep.graph_module.modules():
        graph = getattr(gm, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op in ("call_function", "call_method", "call_module"):
                if node.op != "call_function":
                    raise Refused(f"the graph has a {node.op} node; only functional aten graphs are allowed")
                name, op = _op_name(node.target), node.target
                schema = op._schema if isinstance(op, torch._ops.OpOverload) else None
                names = [a.name for a in schema.arguments] if schema is not None else []
                _check_op(name, [*zip(names, node.args), *node.kwargs.items()])
                if schema is not None and (schema.is_mutable or torch.Tag.nondeterministic_seeded in op.tags and
                                           op._overloadpacket.__name__ not in FLAGS):
                    raise Refused(f"the graph calls {name[:80]!r}: only side-effect-free aten ops are allowed")


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
