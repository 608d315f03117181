"""TFLite export of Keras models in every format of the project, and the fast int8 path on XNNPACK.

`export_tflite(model, path, fmt=..., input_size=S)` converts a tf-keras model (plain, pruned and
stripped, or tfmot QAT-wrapped) from a concrete function whose input is pinned to [1, S, S, 3],
so the file has static shapes and no run-time shape ops (ECOSYSTEM §B9), with builtin ops only
(never SELECT_TF_OPS), and writes it atomically (temporary file + rename).

Formats (CONTRACT.md, `results.csv` column `format`):

| fmt           | converter settings                                                          |
|---------------|-----------------------------------------------------------------------------|
| `fp32`        | none                                                                        |
| `fp16`        | Optimize.DEFAULT, supported_types=[float16] (fp16 weights, float compute)    |
| `drq`         | Optimize.DEFAULT, no representative set (int8 weights, float activations)   |
| `int8`        | full integer with float I/O, representative set (see "fast int8" below)     |
| `int16x8`     | 16-bit activations / int8 weights (EXPERIMENTAL_..._INT16_WEIGHTS_INT8)     |
| `fp32_sparse` | Optimize.EXPERIMENTAL_SPARSITY (sparse weight storage, DENSIFY at run time) |
| `int8_sparse` | [DEFAULT, EXPERIMENTAL_SPARSITY] + representative set                       |

QAT models take the same path: `Optimize.DEFAULT` with the representative set, which calibrates
the ranges the fake-quant nodes do not cover (without one the file keeps float islands, STACK
§2c).

The fast int8 path (`xnnpack_friendly=True`, the default for `int8`; reference/INT8.md): XNNPACK
has no int8 kernels for SOFTMAX, GELU, HARD_SWISH, AVERAGE_POOL_2D, SQUARED_DIFFERENCE, RSQRT,
and the int8 ADD/SUB of a LayerNorm fail its scale-ratio checks, so a plain full-int8 transformer
falls apart into many partitions with int8 ops on the slow builtin kernels. Here:

1. the model is calibrated once (`_experimental_calibrate_only`, what
   `tf.lite.experimental.QuantizationDebugger` does), calibration ranges narrower than
   `MIN_RANGE` (units that never fire, constant tensors) are widened, and it is quantized with
   `convert.mlir_quantize(..., denylisted_nodes=...)` (the debugger's
   `get_nondebug_quantized_model`), keeping in float: every op of a Keras LayerNormalization
   and of a `models.layers.AxisSoftmax` (matched by layer name), every op of a float-only type in
   XNNPACK int8, the layers whose int8 kernel XNNPACK can run slower than its float one
   (`slow_int8_layers`: a depthwise convolution with a channel multiplier > 1, which int8 runs
   as a grouped convolution of tiny groups, on AMX tiles where the CPU has them, and
   Mobile-Former's dynamic ReLUs, whose int8 MULs have no wide x86 kernel; the audit counts the
   convolutions as float heavy ops), and the PADs feeding only float ops (fused into the float
   convolution then); int8 ops of a float-only type that the quantizer makes anyway (around a
   QAT model's fake-quant nodes) are run in float between a DEQUANTIZE and a QUANTIZE;
2. the right-hand input of every int8 BATCH_MATMUL (k for q·kᵀ, v for attn·v) gets zero point 0:
   XNNPACK rejects a non-zero RHS zero point, and the converter has no option for a symmetric
   activation, so the flatbuffer is edited in place (`symmetric_bmm=True`; the tensors joined to
   that input by RESHAPE/TRANSPOSE-like ops get the same new parameters, their producers
   requantize). With `symmetric_bmm=False` the BATCH_MATMULs are kept in float instead;
3. the file is probed with the XNNPACK delegate; int8 ops it still leaves out (e.g. an ADD whose
   scales fail the ratio check) are added to the float list and the model re-quantized, up to
   `max_passes` times.

Measured (vit_tiny_patch16, 224 px, random init, 32 calibration images, ai-edge-litert 2.3.0,
1 thread, 2-core VM under load ~8, median of 3 fresh-process p50s): plain int8 101 partitions,
172 ms; xnnpack-friendly int8 2 partitions (the float class-token STRIDED_SLICE is the only op
left out, as in fp32), 15.3 ms; with BATCH_MATMUL kept float instead 20.1 ms; fp32 68.7 ms;
drq 25.4 ms.

SPLIT_V (which XNNPACK does not take, even in float) is not emitted by the project's attention
(three Dense q/k/v layers, `models.layers.multi_head_attention`); `audit_tflite` reports any.

`export_tflite` returns metadata (path, fmt, input_size, size_bytes, gzip_bytes, convert_s, ...).
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np

from compress.tflite_file import TFLiteFile, run_in_float
from models.compat import keras, tf
from models.layers import AxisSoftmax

FORMATS = ("fp32", "fp16", "drq", "int8", "int16x8", "fp32_sparse", "int8_sparse")
# Calibration ranges narrower than this are widened to it before quantization (dead units,
# constants: `TFLiteFile.widen_narrow_ranges`). Measured: a mobile_former_26m trained on
# Imagenette has 30 such tensors on 32 calibration images (hyper-MLP ReLUs that never fire,
# attention of exactly 1/3 over its 3 tokens), and its int8 file, ours and the converter's plain
# one alike, aborted XNNPACK's preparation (double free). 1e-3 keeps XNNPACK's requantization
# ratio of the ops around such a tensor under its limit of 256 for ordinary input and weight
# scales; a live activation is never that narrow in a trained network.
MIN_RANGE = 1e-3
NEEDS_REPRESENTATIVE = ("int8", "int16x8", "int8_sparse")

# Op types whose int8 form XNNPACK does not take (INT8.md §1, xnnpack_delegate.cc) but whose float
# form it does: kept float in the xnnpack-friendly int8 file.
FLOAT_ONLY_IN_XNNPACK_INT8 = ("SOFTMAX", "GELU", "HARD_SWISH", "AVERAGE_POOL_2D",
                              "SQUARED_DIFFERENCE", "RSQRT", "SQRT", "DIV", "EXP", "LOG",
                              "MAXIMUM", "MINIMUM", "PRELU", "POW")
# Ops whose int8 input and output share quantization parameters (the BMM-RHS rewrite follows
# them): op type -> indices of the data inputs.
# Ops whose int8 input and output must share quantization parameters (XNNPACK refuses a PAD
# or resize whose input was re-quantized without its output): symmetric groups cross them.
_SAME_SCALE = {"RESHAPE": (0,), "TRANSPOSE": (0,), "SQUEEZE": (0,), "EXPAND_DIMS": (0,),
               "PAD": (0,), "PADV2": (0,), "MAX_POOL_2D": (0,), "DEPTH_TO_SPACE": (0,),
               "SPACE_TO_DEPTH": (0,), "RESIZE_BILINEAR": (0,), "RESIZE_NEAREST_NEIGHBOR": (0,),
               "STRIDED_SLICE": (0,), "SLICE": (0,), "GATHER": (0,), "SPLIT": (1,),
               "SPLIT_V": (0,), "UNPACK": (0,), "BROADCAST_TO": (0,), "PACK": None,
               "CONCATENATION": None}


def slow_int8_layers(model) -> dict[str, str]:
    """Layers kept float in the fast int8 file because XNNPACK's int8 kernel for them can be much
    slower than its float one: {layer name: reason}.

    A depthwise convolution with depth_multiplier > 1 runs in int8 as a grouped convolution of
    tiny groups, on the int8 GEMM kernels; on a CPU with Intel AMX those are AMX tile kernels,
    which waste most of each 16x64 tile on such groups. Measured (mobile_former_52m, 224 px,
    1 thread, this AMX VM under load): its seven such layers cost the int8 file 2.4 ms (7.0 ->
    4.5 ms with them float; fp32 3.4 ms); with AMX refused to XNNPACK (AVX512-VNNI kernels,
    compress/benchmark.py) the two files run alike (3.51 vs 3.54 ms). The 3-channel image stem
    is also slower in int8 under AMX but stays int8, so that the convolutions of a QAT file are
    all int8. (Mobile-Former builds its stride-1 expanding depthwise convs as a one-hot 1x1 conv
    + a plain depthwise conv, `models.mobile_former.ChannelRepeat`, which int8 runs fast.)

    A dynamic ReLU (Mobile-Former's `DynamicReLU`: two per-channel products and a sum over the
    whole feature map) stays float too: XNNPACK's int8 MUL has only a 128-bit kernel on x86 (no
    AVX2/AVX-512 variant), about 2x slower than its float MUL per element. Measured on the 2-core
    AMD EPYC (Zen 5, no AMX), one thread, interleaved fresh-process p50s: mobile_former_26m int8
    2.43 -> 2.23 ms (fp32 2.29), mobile_former_294m 4.81 -> 4.33 ms (fp32 6.7).
    """
    out = {}
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.DepthwiseConv2D) and inner.depth_multiplier > 1:
            out[layer.name] = f"depthwise depth_multiplier={inner.depth_multiplier}"
        elif type(inner).__name__ == "DynamicReLU":
            out[layer.name] = "dynamic ReLU: int8 MUL is slower than float MUL in XNNPACK (x86)"
    return out


def layers_matching(model, globs: Iterable[str]) -> list[str]:
    """Names of the layers matching any glob (tfmot's `quant_` prefix ignored); ValueError for a
    glob that matches none."""
    names = [layer.name for layer in model.layers]
    out = set()
    for g in globs:
        hit = [n for n in names if fnmatch.fnmatchcase(n, g)
               or fnmatch.fnmatchcase(n.removeprefix("quant_"), g)]  # fmt: skip
        if not hit:
            raise ValueError(f"float_layers: {g!r} matches no layer of {model.name} "
                             f"(layers: {', '.join(names[:6])}, ...)")  # fmt: skip
        out.update(hit)
    return sorted(out)


def _is_qat(model) -> bool:
    names = {type(layer).__name__ for layer in model.layers}
    return bool(names & {"QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"})


def _layer_names_of(model, cls) -> list[str]:
    """Names of the layers of class `cls`, also when wrapped (tfmot wrappers keep `.layer`)."""
    out = []
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, cls) or isinstance(layer, cls):
            out.append(layer.name)
            if inner is not layer:
                out.append(inner.name)
    return out


def representative_fn(representative, input_size: int, limit: int | None = None
                      ) -> Callable[[], Iterable[list[np.ndarray]]]:
    """Normalizes a representative set into the converter's callable.

    Args:
      representative: images [N, S, S, 3] (numpy or tensor), a list of images or batches, a
        `tf.data.Dataset` of images or batches (or of (image, label) pairs), or a callable
        returning such an iterable.
      input_size: S; images of another size are refused (calibrate at the export size).
      limit: the number of images to use (None: all).
    Returns: a function yielding [x] with x of shape [1, S, S, 3], float32.
    """
    def images():
        src = representative() if callable(representative) else representative
        if isinstance(src, (np.ndarray, tf.Tensor)):
            src = [src]
        for item in src:
            if isinstance(item, (tuple, list)) and len(item) and not np.isscalar(item[0]):
                item = item[0]
            if isinstance(item, dict):
                item = item.get("image", next(iter(item.values())))
            arr = np.asarray(item, np.float32)
            if arr.ndim == 3:
                arr = arr[None]
            yield from arr

    def gen():
        n = 0
        for x in images():
            if x.shape != (input_size, input_size, 3):
                raise ValueError(f"representative image of shape {x.shape}, expected "
                                 f"({input_size}, {input_size}, 3)")
            yield [x[None]]
            n += 1
            if limit is not None and n >= limit:
                return
        if n == 0:
            raise ValueError("the representative set is empty")

    return gen


def _converter(model, input_size: int):
    spec = tf.TensorSpec([1, input_size, input_size, 3], tf.float32, name="image")
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)
    concrete = fn.get_concrete_function()
    # No trackable object: the converter then freezes the function's graph directly instead of
    # saving a SavedModel first, 10x faster (mobilevit_xxs at 64 px: 2.2 s against 24.7 s).
    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # never SELECT_TF_OPS
    return conv


def _configure(conv, fmt: str, rep, strict_int8: bool):
    opt = tf.lite.Optimize
    if fmt == "fp16":
        conv.optimizations = [opt.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif fmt == "drq":
        conv.optimizations = [opt.DEFAULT]
    elif fmt == "int8":
        conv.optimizations = [opt.DEFAULT]
        conv.representative_dataset = rep
        if strict_int8:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif fmt == "int16x8":
        conv.optimizations = [opt.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,  # float fallback for ops without a 16x8 kernel
        ]
    elif fmt == "fp32_sparse":
        conv.optimizations = [opt.EXPERIMENTAL_SPARSITY]
    elif fmt == "int8_sparse":
        conv.optimizations = [opt.DEFAULT, opt.EXPERIMENTAL_SPARSITY]
        conv.representative_dataset = rep
    return conv


def _atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -- the fast int8 path ------------------------------------------------------------------------


def _name_parts(name: str) -> list[str]:
    return [p for p in name.split(";") if p]


def _initial_float_nodes(calibrated: bytes, float_layers: list[str], keep_bmm_float: bool,
                         extra: Iterable[str] = ()) -> set[str]:
    """Output-tensor names of the ops to keep float (the names `mlir_quantize` denylists)."""
    f = TFLiteFile(calibrated)
    layer_re = (re.compile("|".join(rf"(^|/){re.escape(n)}/" for n in float_layers))
                if float_layers else None)  # fmt: skip
    extra_re = re.compile("|".join(extra)) if extra else None
    types = set(FLOAT_ONLY_IN_XNNPACK_INT8) | ({"BATCH_MATMUL"} if keep_bmm_float else set())
    nodes = set()
    for op in f.ops:
        names = [f.tensors[t].name for t in op.outputs]
        parts = [p for n in names for p in _name_parts(n)]
        if (op.type in types
                or (layer_re is not None and any(layer_re.search(p) for p in parts))
                or (extra_re is not None and any(extra_re.search(p) for p in parts))):
            nodes.update(names)
    return _with_feeding_pads(f, nodes)


def _with_feeding_pads(f: TFLiteFile, nodes: set[str]) -> set[str]:
    """Adds the PADs whose every consumer stays float: an int8 PAD in front of a float
    convolution leaves a separate pad pass plus a DEQUANTIZE of the padded map, where a float
    PAD is fused into the convolution by XNNPACK (mobile_former_26m: 0.14 ms of int8 PADs)."""
    for op in f.ops:
        if op.type not in ("PAD", "PADV2") or not op.outputs:
            continue
        consumers = f.consumers.get(op.outputs[0], [])
        if consumers and all(f.tensors[t].name in nodes
                             for c in consumers for t in f.ops[c].outputs):
            nodes.update(f.tensors[t].name for t in op.outputs)
    return nodes


def _asymmetric_bmm_rhs(f: TFLiteFile):
    """(op, right-hand tensor) of every int8 BATCH_MATMUL whose right-hand input has a non-zero
    zero point, which XNNPACK refuses."""
    for op in f.ops:
        if op.type != "BATCH_MATMUL" or len(op.inputs) < 2:
            continue
        rhs = f.tensors[op.inputs[1]]
        if rhs.dtype == "INT8" and rhs.zero_point is not None and int(rhs.zero_point[0]) != 0:
            yield op, rhs


def _bmm_rhs_groups(f: TFLiteFile) -> list[list[int]]:
    """Tensor groups, one per int8 BATCH_MATMUL right-hand activation with a non-zero zero point,
    closed under same-scale ops (RESHAPE/TRANSPOSE/...); groups reaching a constant are skipped."""
    groups, done = [], set()
    for _, rhs in _asymmetric_bmm_rhs(f):
        if rhs.has_data or rhs.index in done:
            continue
        group, stack, ok = set(), [rhs.index], True
        while stack:
            t = stack.pop()
            if t in group or t < 0:
                continue
            tt = f.tensors[t]
            if tt.has_data or tt.dtype != "INT8" or tt.scale is None or tt.scale.size != 1:
                ok = False
                break
            group.add(t)
            prod = f.producer.get(t)
            if prod is not None and f.ops[prod].type in _SAME_SCALE:
                p = f.ops[prod]
                idx = _SAME_SCALE[p.type]
                data = [p.inputs[i] for i in idx] if idx is not None else list(p.inputs)
                stack += data + list(p.outputs)
            for c in f.consumers.get(t, []):
                cop = f.ops[c]
                if cop.type in _SAME_SCALE:
                    idx = _SAME_SCALE[cop.type]
                    data = [cop.inputs[i] for i in idx] if idx is not None else list(cop.inputs)
                    if t in data:
                        stack += data + list(cop.outputs)
        done |= group
        if ok:
            groups.append(sorted(group))
    return groups


def symmetric_bmm_rhs(model_bytes: bytes) -> tuple[bytes, int]:
    """Gives every int8 BATCH_MATMUL right-hand input zero point 0 (in place, see module doc).

    Returns: (the edited file, the number of BATCH_MATMUL inputs rewritten).
    """
    f = TFLiteFile(model_bytes)
    groups = _bmm_rhs_groups(f)
    for g in groups:
        f.set_symmetric_quantization(g)
    constants = _bmm_constant_rhs(f)
    for t in constants:
        f.requantize_constant_symmetric(t)
    return f.data_bytes(), len(groups) + len(constants)


def _bmm_constant_rhs(f: TFLiteFile) -> list[int]:
    """Constant per-tensor int8 right-hand BATCH_MATMUL inputs with a non-zero zero point that
    nothing else reads (Mobile-Former's first bridge: its tokens are the learned constants)."""
    return [rhs.index for op, rhs in _asymmetric_bmm_rhs(f)
            if rhs.has_data and rhs.scale is not None and rhs.scale.size == 1
            and f.consumers.get(rhs.index) == [op.index]]


def _float_only_ops_in_float(model_bytes: bytes, info: dict) -> bytes:
    """int8 ops of a type XNNPACK runs in float only that the quantizer made anyway (a QAT
    model's fake-quant nodes around a GELU or a HARD_SWISH decide for the denylist) are run in
    float between a DEQUANTIZE and a QUANTIZE (`tflite_file.run_in_float`). Measured on
    mobile_former_26m QAT: 8 int8 GELUs + 2 HARD_SWISHes left 11 XNNPACK partitions; 1 after."""
    f = TFLiteFile(model_bytes)
    ops = [op.index for op in f.ops if op.type in FLOAT_ONLY_IN_XNNPACK_INT8
           and any(f.tensors[t].dtype == "INT8" for t in op.outputs)]
    info["int8_ops_run_in_float"] = len(ops)
    return run_in_float(model_bytes, ops) if ops else model_bytes


def _int8_xnnpack_friendly(conv, float_layers, *, symmetric_bmm: bool, max_passes: int,
                           extra_float: Iterable[str], info: dict) -> bytes:
    from tensorflow.lite.python import convert as tfl_convert

    conv.experimental_mlir_quantizer = True
    conv._experimental_calibrate_only = True
    calibrated = conv.convert()
    f = TFLiteFile(calibrated)
    info["widened_ranges"] = len(f.widen_narrow_ranges(MIN_RANGE))
    calibrated = f.data_bytes()
    float_nodes = _initial_float_nodes(calibrated, float_layers, not symmetric_bmm, extra_float)
    result, bmm = None, 0
    for i in range(max(1, max_passes)):
        quant = tfl_convert.mlir_quantize(
            calibrated,
            disable_per_channel=conv._experimental_disable_per_channel,
            fully_quantize=False,  # float input and output, like the plain int8 file
            denylisted_nodes=sorted(float_nodes),
        )
        quant = _float_only_ops_in_float(quant, info)
        plain = quant
        if symmetric_bmm:
            quant, bmm = symmetric_bmm_rhs(quant)
        result = quant
        info["passes"] = i + 1
        probe = _probe(quant)
        if not probe["ok"] and symmetric_bmm:
            # The zero-point edit made a file XNNPACK cannot prepare: keep the converter's own
            # quantization (its int8 BATCH_MATMULs then run outside the delegate).
            info["bmm_edit_refused"] = str(probe.get("error", ""))[:200]
            result, bmm = plain, 0
            probe = _probe(plain)
        info["partitions"] = probe["partitions"]
        if not probe["ok"]:
            break
        # int8 ops XNNPACK still refused (e.g. ADD/SUB/MUL failing its scale-ratio checks)
        f = TFLiteFile(result)
        left = _undelegated_int8_outputs(result, f)
        new = {n for n in left if n not in float_nodes}
        if not new:
            break
        float_nodes |= new
    info["float_nodes"] = len(float_nodes)
    info["bmm_rhs_symmetric"] = bmm
    return result


def _probe(model_bytes: bytes) -> dict:
    """XNNPACK probe (prepare and one invoke) of a candidate file in a child process: an edited
    file can crash the runtime (a double free in allocate_tensors, seen on the int8 graph of
    keras-cv-attention-models' MobileViT-XS), which must not take the converter down with it."""
    from compress.audit import probe_delegation_isolated

    with tempfile.TemporaryDirectory(prefix="probe_") as d:
        path = os.path.join(d, "candidate.tflite")
        with open(path, "wb") as f:
            f.write(model_bytes)
        return probe_delegation_isolated(path, 1, "xnnpack")


def _undelegated_int8_outputs(model_bytes: bytes, f: TFLiteFile) -> set[str]:
    from compress.audit import make_interpreter

    it = make_interpreter(model_bytes, 1, "xnnpack", disable_delegate_node_fusion=True)
    ops = it._get_ops_details()
    taken = {tuple(sorted(op["outputs"])) for op in ops if op["op_name"] == "DELEGATE"}
    names = set()
    for op in ops:
        if op["op_name"] in ("DELEGATE", "QUANTIZE", "DEQUANTIZE"):
            continue
        if tuple(sorted(op["outputs"])) in taken:
            continue
        outs = [f.tensors[t] for t in op["outputs"]]
        if any(t.dtype in ("INT8", "UINT8") for t in outs):
            names.update(t.name for t in outs)
    return names


# -- the public entry point --------------------------------------------------------------------


def export_tflite(
    model,
    path: str | os.PathLike,
    *,
    fmt: str,
    input_size: int,
    representative=None,
    num_calibration: int | None = 100,
    xnnpack_friendly: bool = True,
    symmetric_bmm: bool = True,
    max_passes: int = 3,
    extra_float_nodes: Iterable[str] = (),
    float_layers: Iterable[str] = (),
    strict_int8: bool = False,
) -> dict:
    """Converts `model` to a .tflite file of format `fmt` at input [1, input_size, input_size, 3].

    Args:
      model: a tf-keras functional model taking [B, H, W, 3] images (static or dynamic H, W);
        plain, pruned-and-stripped or tfmot QAT-wrapped.
      path: where to write the file (written atomically; folders are created).
      fmt: one of `FORMATS`.
      input_size: the square input size pinned in the file.
      representative: calibration images at `input_size` (see `representative_fn`); required for
        int8, int16x8 and int8_sparse, QAT models included (it calibrates the ranges the
        fake-quant nodes miss).
      num_calibration: how many representative images to use (None: all).
      xnnpack_friendly: int8 only: keep LayerNorm pieces and XNNPACK-float-only ops in float and
        make int8 BATCH_MATMUL inputs symmetric so the file runs in one XNNPACK partition (module
        doc). False gives the converter's plain full-integer file.
      symmetric_bmm: with `xnnpack_friendly`: rewrite BATCH_MATMUL right-hand inputs to zero
        point 0 (True) or keep BATCH_MATMUL float (False).
      max_passes: with `xnnpack_friendly`: quantize/probe rounds to move still-undelegated int8
        ops to float.
      extra_float_nodes: with `xnnpack_friendly`: regular expressions; ops whose output-tensor
        name matches one are also kept float.
      float_layers: with `xnnpack_friendly`: layer-name globs (e.g. "block1_*"); the ops of the
        matching layers are also kept float (for layers that int8 does not speed up).
      strict_int8: plain int8 only: `TFLITE_BUILTINS_INT8` (fail on an op without an int8
        kernel) instead of allowing a float fallback.
    Returns: dict(path, fmt, input_size, size_bytes, gzip_bytes, convert_s, qat,
      xnnpack_friendly, and for the fast int8 path: passes, float_nodes, bmm_rhs_symmetric,
      partitions).
    Raises:
      ValueError: unknown `fmt`, a format that needs a representative set without one, or a
        `float_layers` glob that matches no layer.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    qat = _is_qat(model)
    if fmt in NEEDS_REPRESENTATIVE and representative is None:
        raise ValueError(f"fmt={fmt!r} needs a representative set (images at the export size)")
    input_size = int(input_size)
    rep = (representative_fn(representative, input_size, num_calibration)
           if representative is not None else None)
    friendly = fmt == "int8" and xnnpack_friendly
    info = dict(path=os.fspath(path), fmt=fmt, input_size=input_size, qat=qat,
                xnnpack_friendly=friendly)
    t0 = time.perf_counter()
    conv = _configure(_converter(model, input_size), fmt, rep, strict_int8 and not friendly)
    if friendly:
        ln = (_layer_names_of(model, keras.layers.LayerNormalization)
              + _layer_names_of(model, AxisSoftmax))  # explicit softmax ops stay float too
        slow = sorted(slow_int8_layers(model))
        info["slow_int8_float_layers"] = len(slow)
        chosen = layers_matching(model, float_layers)
        data = _int8_xnnpack_friendly(conv, ln + slow + chosen, symmetric_bmm=symmetric_bmm,
                                      max_passes=max_passes, extra_float=extra_float_nodes,
                                      info=info)
    else:
        data = conv.convert()
    info["convert_s"] = round(time.perf_counter() - t0, 3)
    _atomic_write(os.fspath(path), data)
    info["size_bytes"] = len(data)
    info["gzip_bytes"] = len(gzip.compress(data, compresslevel=9))
    return info
