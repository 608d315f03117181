"""The fast int8 path (`xnnpack_friendly=True`, the default for `int8`): XNNPACK
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
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from collections.abc import Iterable

from compress.tflite.flatbuffer import TFLiteFile, run_in_float, symmetric_bmm_rhs
from compress.tflite.interpreter import make_interpreter, probe_delegation_isolated
from models.compat import keras


# Calibration ranges narrower than this are widened to it before quantization (dead units,
# constants: `TFLiteFile.widen_narrow_ranges`). Measured: a mobile_former_26m trained on
# Imagenette has 30 such tensors on 32 calibration images (hyper-MLP ReLUs that never fire,
# attention of exactly 1/3 over its 3 tokens), and its int8 file, ours and the converter's plain
# one alike, aborted XNNPACK's preparation (double free). 1e-3 keeps XNNPACK's requantization
# ratio of the ops around such a tensor under its limit of 256 for ordinary input and weight
# scales; a live activation is never that narrow in a trained network.
MIN_RANGE = 1e-3


# Op types whose int8 form XNNPACK does not take (XNNPACK's xnnpack_delegate.cc) but whose float
# form it does: kept float in the xnnpack-friendly int8 file.
FLOAT_ONLY_IN_XNNPACK_INT8 = ("SOFTMAX", "GELU", "HARD_SWISH", "AVERAGE_POOL_2D",
                              "SQUARED_DIFFERENCE", "RSQRT", "SQRT", "DIV", "EXP", "LOG",
                              "MAXIMUM", "MINIMUM", "PRELU", "POW")


def slow_int8_layers(model) -> dict[str, str]:
    """Layers kept float in the fast int8 file because XNNPACK's int8 kernel for them can be much
    slower than its float one: {layer name: reason}.

    A depthwise convolution with depth_multiplier > 1 runs in int8 as a grouped convolution of
    tiny groups, on the int8 GEMM kernels; on a CPU with Intel AMX those are AMX tile kernels,
    which waste most of each 16x64 tile on such groups. Measured (mobile_former_52m, 224 px,
    1 thread, this AMX VM under load): its seven such layers cost the int8 file 2.4 ms (7.0 ->
    4.5 ms with them float; fp32 3.4 ms); with AMX refused to XNNPACK (AVX512-VNNI kernels,
    compress/measure/latency.py) the two files run alike (3.51 vs 3.54 ms). The 3-channel image stem
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


def _float_only_ops_in_float(model_bytes: bytes, info: dict) -> bytes:
    """int8 ops of a type XNNPACK runs in float only that the quantizer made anyway (a QAT
    model's fake-quant nodes around a GELU or a HARD_SWISH decide for the denylist) are run in
    float between a DEQUANTIZE and a QUANTIZE (`flatbuffer.run_in_float`). Measured on
    mobile_former_26m QAT: 8 int8 GELUs + 2 HARD_SWISHes left 11 XNNPACK partitions; 1 after."""
    f = TFLiteFile(model_bytes)
    ops = [op.index for op in f.ops if op.type in FLOAT_ONLY_IN_XNNPACK_INT8
           and any(f.tensors[t].dtype == "INT8" for t in op.outputs)]
    info["int8_ops_run_in_float"] = len(ops)
    return run_in_float(model_bytes, ops) if ops else model_bytes


def float_layer_names(model, float_layers: Iterable[str] = ()) -> list[str]:
    """The layers whose ops stay float in the fast int8 file: every LayerNormalization and
    `AxisSoftmax`, the `slow_int8_layers`, and those matching the user's `float_layers` globs."""
    from models.layers import AxisSoftmax

    return (_layer_names_of(model, keras.layers.LayerNormalization)
            + _layer_names_of(model, AxisSoftmax)  # explicit softmax ops stay float too
            + sorted(slow_int8_layers(model)) + layers_matching(model, float_layers))


def quantize(conv, model, *, float_layers: Iterable[str] = (), symmetric_bmm: bool = True,
             max_passes: int = 3, extra_float: Iterable[str] = (), info: dict) -> bytes:
    """The fast int8 file of the configured converter `conv` of `model` (module doc, steps 1-3);
    facts about the conversion go into `info`."""
    from tensorflow.lite.python import convert as tfl_convert

    info["slow_int8_float_layers"] = len(slow_int8_layers(model))
    float_layers = float_layer_names(model, float_layers)

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
    with tempfile.TemporaryDirectory(prefix="probe_") as d:
        path = os.path.join(d, "candidate.tflite")
        with open(path, "wb") as f:
            f.write(model_bytes)
        return probe_delegation_isolated(path, 1, "xnnpack")


def _undelegated_int8_outputs(model_bytes: bytes, f: TFLiteFile) -> set[str]:
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
