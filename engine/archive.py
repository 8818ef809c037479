"""What a hand-off may hold (the evaluator's first line of defence): the torch.export archives train.py wrote, read
entry by entry, checked and rebuilt in memory (check_archive), and the graphs torch loaded from them, op by op
(check_graphs). Only plain tensors and side-effect-free aten ops pass; nothing torch would unpickle ever reaches it."""
import io
import json
import re
import zipfile


class Refused(Exception):
    """The hand-off is refused (exit 1): the candidate's fault."""


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
    except (zipfile.BadZipFile, EOFError, OverflowError, KeyError, ValueError, TypeError, AttributeError,
            RecursionError) as e:
        raise Refused(f"not a torch.export archive ({type(e).__name__}: {str(e)[:200]})")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as w:
        for name, data in out.items():
            w.writestr("archive/" + name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the hand-off


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
