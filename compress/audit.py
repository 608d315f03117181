"""Audit of .tflite files and static costs of Keras models.

* `make_interpreter(path, threads, delegate)`: the project's one way to build an
  `ai_edge_litert` interpreter (XNNPACK default delegate or none; dynamic inputs resized before
  the first `allocate_tensors`, see reference/STACK.md §2d).
* `audit_tflite(path)`: op counts by type and by output dtype, Flex/custom ops, float heavy ops,
  XNNPACK partitions and the ops left outside the delegate, whether ai_edge_litert can run the
  file with XNNPACK or only without default delegates, and the sparsity of the prunable weights.
* `parity(model, path, images)`: Keras-vs-TFLite max |diff| and top-1 agreement.
* `static_costs(model, input_size)`: parameters, MACs and an estimate of memory traffic.

How delegation is measured (reference/INT8.md): `_get_ops_details()` lists the graph's nodes and
then the DELEGATE nodes. The number of partitions is the number of DELEGATE nodes with the default
node fusion; which ops a delegate took is read from a second interpreter built with
`experimental_disable_delegate_node_fusion=True`, where every delegated op gets its own DELEGATE
node with exactly that op's outputs. Running a file can abort the process (16x8 files with
LayerNorm SIGABRT in `allocate_tensors`, INT8.md §2), so `audit_tflite` probes in a child process
by default and reports a crash instead of dying with it.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np

from compress.tflite_file import TFLiteFile, op_counts

HEAVY_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL",
             "TRANSPOSE_CONV", "CONV_3D")
FLOAT_DTYPES = ("FLOAT32", "FLOAT16")
DELEGATES = ("xnnpack", "none")


def _interp_module():
    from ai_edge_litert import interpreter  # imported lazily: light, but not needed to parse

    return interpreter


def make_interpreter(path, threads: int = 1, delegate: str = "xnnpack", *, input_shape=None,
                     allocate: bool = True, disable_delegate_node_fusion: bool = False):
    """Builds an `ai_edge_litert.interpreter.Interpreter` for a .tflite file.

    Args:
      path: file path, or the model's bytes.
      threads: `num_threads` (>= 1).
      delegate: "xnnpack" (the default XNNPACK delegate, as `Interpreter()` applies it) or
        "none" (`OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`, the builtin kernels).
      input_shape: shape to give a dynamic input (shape signature with -1), e.g. [1, 256, 256, 3];
        applied with `resize_tensor_input` *before* the first `allocate_tensors` (a dynamic file
        allocated at its placeholder shape [1, 1, 1, 3] fails, STACK §2d). Required for dynamic
        inputs, ignored when it equals a static input's shape.
      allocate: call `allocate_tensors()` (this is when XNNPACK is applied and may fail).
      disable_delegate_node_fusion: one DELEGATE node per delegated op (for auditing only).
    Returns: the interpreter, tensors allocated when `allocate`.
    Raises:
      ValueError: unknown delegate, or a dynamic input without `input_shape`.
      RuntimeError: from ai_edge_litert when the file cannot be prepared.
    """
    if delegate not in DELEGATES:
        raise ValueError(f"delegate must be one of {DELEGATES}, got {delegate!r}")
    ip = _interp_module()
    resolver = (ip.OpResolverType.AUTO if delegate == "xnnpack"
                else ip.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    kwargs = dict(num_threads=int(threads), experimental_op_resolver_type=resolver,
                  experimental_disable_delegate_node_fusion=disable_delegate_node_fusion)
    if isinstance(path, (bytes, bytearray)):
        it = ip.Interpreter(model_content=bytes(path), **kwargs)
    else:
        it = ip.Interpreter(model_path=os.fspath(path), **kwargs)
    for d in it.get_input_details():
        sig = list(d.get("shape_signature", d["shape"]))
        if any(s < 0 for s in sig):
            if input_shape is None:
                raise ValueError(f"input {d['name']!r} has dynamic shape {sig}: pass input_shape")
            it.resize_tensor_input(d["index"], list(input_shape), strict=False)
        elif input_shape is not None and list(input_shape) != list(d["shape"]):
            raise ValueError(f"static input {d['name']!r} has shape {list(d['shape'])}, "
                             f"not {list(input_shape)}")
    if allocate:
        it.allocate_tensors()
    return it


def _set_input(it, x: np.ndarray) -> None:
    d = it.get_input_details()[0]
    if d["dtype"] in (np.int8, np.uint8, np.int16):
        scale, zp = d["quantization"]
        info = np.iinfo(d["dtype"])
        x = np.clip(np.round(x / scale + zp), info.min, info.max)
    it.set_tensor(d["index"], x.astype(d["dtype"]))


def _get_output(it) -> np.ndarray:
    d = it.get_output_details()[0]
    y = it.get_tensor(d["index"])
    if d["dtype"] in (np.int8, np.uint8, np.int16):
        scale, zp = d["quantization"]
        y = (y.astype(np.float32) - zp) * scale
    return y.astype(np.float32)


def run_tflite(it, images: np.ndarray) -> np.ndarray:
    """Runs a batch-1 interpreter over `images` [N, H, W, 3]; returns the stacked outputs."""
    outs = []
    for x in images:
        _set_input(it, np.asarray(x, np.float32)[None])
        it.invoke()
        outs.append(_get_output(it)[0])
    return np.stack(outs)


# -- delegation probe --------------------------------------------------------------------------


def probe_delegation(path, threads: int = 1, delegate: str = "xnnpack", *, input_shape=None,
                     invoke: bool = True) -> dict:
    """Builds the interpreter(s) in this process and reports runnability and delegation.

    Returns a dict: `ok` (prepared and, with `invoke`, ran once on a zero input), `error` (str or
    None), `partitions` (DELEGATE nodes with default fusion; 0 for delegate="none"),
    `undelegated_ops` ({op: count} of ops outside the delegate; every op for "none") and
    `undelegated_detail` ({"OP:DTYPE": count}, dtype of the first output).
    """
    out = dict(delegate=delegate, ok=False, error=None, partitions=0, undelegated_ops={},
               undelegated_detail={})
    try:
        it = make_interpreter(path, threads, delegate, input_shape=input_shape)
        if invoke:
            d = it.get_input_details()[0]
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
            it.invoke()
        ops = it._get_ops_details()
        out["partitions"] = sum(op["op_name"] == "DELEGATE" for op in ops)
        if delegate == "xnnpack":
            it2 = make_interpreter(path, threads, delegate, input_shape=input_shape,
                                   disable_delegate_node_fusion=True)
            ops = it2._get_ops_details()
            dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in it2.get_tensor_details()}
        else:
            dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
        taken = {tuple(sorted(op["outputs"])) for op in ops if op["op_name"] == "DELEGATE"}
        for op in ops:
            if op["op_name"] == "DELEGATE" or tuple(sorted(op["outputs"])) in taken:
                continue
            name = op["op_name"]
            out["undelegated_ops"][name] = out["undelegated_ops"].get(name, 0) + 1
            dt = dtypes.get(op["outputs"][0], "?") if len(op["outputs"]) else "?"
            key = f"{name}:{dt.upper()}"
            out["undelegated_detail"][key] = out["undelegated_detail"].get(key, 0) + 1
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported, never raised (the audit must not crash)
        out["error"] = f"{type(e).__name__}: {str(e).strip()[:500]}"
    return out


_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from compress.audit import probe_delegation
args = json.loads(sys.argv[2])
print("@@PROBE@@" + json.dumps(probe_delegation(**args)))
"""


def probe_delegation_isolated(path, threads: int = 1, delegate: str = "xnnpack", *,
                              input_shape=None, timeout: float = 300) -> dict:
    """`probe_delegation` in a child process: an abort (SIGABRT) is reported, not suffered."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = dict(path=os.path.abspath(os.fspath(path)), threads=threads, delegate=delegate,
                input_shape=None if input_shape is None else [int(s) for s in input_shape])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        p = subprocess.run([sys.executable, "-c", _CHILD, root, json.dumps(args)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(delegate=delegate, ok=False, error=f"timeout after {timeout} s",
                    partitions=0, undelegated_ops={}, undelegated_detail={})
    for line in p.stdout.splitlines():
        if line.startswith("@@PROBE@@"):
            return json.loads(line[len("@@PROBE@@"):])
    tail = [ln for ln in (p.stderr or "").strip().splitlines() if "Created TensorFlow" not in ln]
    code = p.returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return dict(delegate=delegate, ok=False,
                error=f"interpreter process died ({how}): {' | '.join(tail[-3:])}".rstrip(": "),
                partitions=0, undelegated_ops={}, undelegated_detail={})


# -- the audit ---------------------------------------------------------------------------------


def _weight_source(f: TFLiteFile, t: int) -> int | None:
    """Follows DENSIFY/DEQUANTIZE back to the constant a weight input comes from."""
    for _ in range(4):
        if t < 0:
            return None
        if f.tensors[t].has_data:
            return t
        prod = f.producer.get(t)
        if prod is None or f.ops[prod].type not in ("DENSIFY", "DEQUANTIZE"):
            return None
        t = f.ops[prod].inputs[0]
    return None


def _is_selection_kernel(values: np.ndarray, shape: tuple) -> bool:
    """A constant conv kernel with exactly one non-zero per output channel, all equal: a channel
    selection (e.g. Mobile-Former's ChannelRepeat one-hot 1x1 conv), not a learned weight."""
    if not shape or values.size != int(np.prod(shape)):
        return False
    out = shape[0]  # TFLite CONV_2D filters are [out, kh, kw, in]
    nz = values.reshape(out, -1) != 0
    return bool((nz.sum(axis=1) == 1).all()) and np.unique(values[values != 0]).size == 1


def weight_sparsity(f: TFLiteFile) -> tuple[float, int]:
    """Fraction of zeros among the weights of CONV_2D and FULLY_CONNECTED (the layers magnitude
    pruning touches; DEPTHWISE_CONV_2D is never pruned, STACK §2a). Sparse tensors count their
    pruned blocks as zeros; constant channel-selection kernels (one-hot 1x1 convs) are not
    weights and are skipped. Returns (fraction, number of weights)."""
    total = zeros = 0
    seen = set()
    for op in f.ops:
        if op.type not in ("CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 2:
            continue
        src = _weight_source(f, op.inputs[1])
        if src is None or src in seen:
            continue
        seen.add(src)
        t = f.tensors[src]
        values = f.buffer_array(src)
        if values is None or (op.type == "CONV_2D" and not t.sparse
                              and _is_selection_kernel(values, t.shape)):
            continue
        dense = int(np.prod(t.shape)) if t.shape else values.size
        total += dense
        zeros += dense - int(np.count_nonzero(values))
    return (zeros / total if total else 0.0), total


def audit_tflite(path, *, threads: int = 1, isolate: bool = True, input_shape=None) -> dict:
    """Audits one .tflite file (never raises for a file ai_edge_litert cannot run).

    Args:
      path: the .tflite file.
      threads: interpreter threads for the runnability probe.
      isolate: probe the interpreter in a child process (a file that aborts is reported).
      input_shape: for files with a dynamic input.
    Returns: a dict with
      `size_bytes`, `gzip_bytes`;
      `input_shape`, `input_signature`, `dynamic_input` (a -1 in the signature),
        `dynamic_shape_ops` (SHAPE and friends computed at run time);
      `ops` ({op: count}, DELEGATE excluded), `num_ops`, `ops_by_dtype` ({op: {dtype: count}},
        dtype of the op's first output);
      `flex_ops` (Flex + other custom ops; 0 is the requirement), `custom_ops` ({code: count});
      `float_heavy_ops` (CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED/BATCH_MATMUL with float output,
        counted in every file; it is the figure that matters for int8 files), `float_heavy_by_op`;
      `quantized` (any int8/int16 activation), `sparse_tensors`, `sparsity`, `sparsity_weights`;
      `runnable` ({"xnnpack": bool, "none": bool}), `errors` ({delegate: message});
      `delegate`: "xnnpack" if the default interpreter runs the file, else "none" if the
        no-default-delegate fallback does, else None;
      `partitions`, `undelegated_ops` ({op: count}), `undelegated_detail` ({"OP:DTYPE": count})
        under XNNPACK (partitions 0 and every op undelegated when XNNPACK cannot run it).
    """
    f = TFLiteFile(path)
    raw = f.data_bytes()
    ops = [op for op in f.ops if op.type != "DELEGATE"]
    by_dtype: dict[str, dict[str, int]] = {}
    heavy: dict[str, int] = {}
    custom: dict[str, int] = {}
    quantized = False
    for op in ops:
        dt = f.tensors[op.outputs[0]].dtype if op.outputs else "NONE"
        by_dtype.setdefault(op.type, {})
        by_dtype[op.type][dt] = by_dtype[op.type].get(dt, 0) + 1
        if op.type in HEAVY_OPS and dt in FLOAT_DTYPES:
            heavy[op.type] = heavy.get(op.type, 0) + 1
        if op.type == "CUSTOM" or op.custom_code:
            code = op.custom_code or "CUSTOM"
            custom[code] = custom.get(code, 0) + 1
        if dt in ("INT8", "UINT8", "INT16") and op.type not in ("DEQUANTIZE",):
            if op.type not in ("SHAPE",):
                quantized = True
    inp = f.tensors[f.inputs[0]]
    sparsity, n_weights = weight_sparsity(f)
    result = dict(
        path=os.fspath(path) if not isinstance(path, (bytes, bytearray)) else None,
        size_bytes=len(raw),
        gzip_bytes=len(gzip.compress(raw, compresslevel=9)),
        input_shape=list(inp.shape),
        input_signature=list(inp.shape_signature or inp.shape),
        dynamic_input=any(s < 0 for s in inp.shape_signature),
        dynamic_shape_ops=sum(op.type in ("SHAPE", "RANK") for op in ops),
        ops=op_counts(ops),
        num_ops=len(ops),
        ops_by_dtype=by_dtype,
        flex_ops=sum(custom.values()),
        custom_ops=custom,
        float_heavy_ops=sum(heavy.values()),
        float_heavy_by_op=heavy,
        quantized=quantized,
        sparse_tensors=sum(t.sparse for t in f.tensors),
        sparsity=sparsity,
        sparsity_weights=n_weights,
    )
    probe = probe_delegation_isolated if isolate else probe_delegation
    if isinstance(path, (bytes, bytearray)) and isolate:
        raise ValueError("isolate=True needs a file path")
    xnn = probe(path, threads, "xnnpack", input_shape=input_shape)
    none = probe(path, threads, "none", input_shape=input_shape)
    result["runnable"] = {"xnnpack": xnn["ok"], "none": none["ok"]}
    result["errors"] = {k: p["error"] for k, p in (("xnnpack", xnn), ("none", none)) if p["error"]}
    result["delegate"] = "xnnpack" if xnn["ok"] else ("none" if none["ok"] else None)
    if xnn["ok"]:
        result["partitions"] = xnn["partitions"]
        result["undelegated_ops"] = xnn["undelegated_ops"]
        result["undelegated_detail"] = xnn["undelegated_detail"]
    else:
        result["partitions"] = 0
        result["undelegated_ops"] = op_counts(ops)
        result["undelegated_detail"] = {}
    return result


def format_op_counts(counts: dict) -> str:
    """{op: count} -> "OP:count;OP:count" (the results.csv form), largest first."""
    return ";".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# -- Keras vs TFLite ---------------------------------------------------------------------------


def parity(model, path, images, *, threads: int = 1, delegate: str | None = None,
           isolate: bool = True) -> dict:
    """Keras-vs-TFLite comparison on `images` [N, S, S, 3] (float, as the model takes them).

    Args:
      model: the Keras model the file was exported from.
      path: the .tflite file (batch-1 input; a dynamic one is resized to the images' shape).
      delegate: "xnnpack", "none", or None for XNNPACK with a fallback to "none" when XNNPACK
        cannot run the file (sparse int8, STACK §2d).
      isolate: first check in a child process that the interpreter runs the file (a file that
        aborts, like a 16x8 one with LayerNorm, raises RuntimeError instead of killing this one).
    Returns: dict(max_abs_diff, mean_abs_diff, rel_l2 (||file - keras|| / ||keras|| over all
      outputs), top1_agreement, n, delegate).
    """
    images = np.asarray(images, np.float32)
    ref = np.asarray(model.predict(images, batch_size=min(len(images), 32), verbose=0))
    shape = [1, *images.shape[1:]]
    tried = [delegate] if delegate else ["xnnpack", "none"]
    last = None
    if isolate and not isinstance(path, (bytes, bytearray)):
        errors = {}
        for d in tried:
            probe = probe_delegation_isolated(path, threads, d, input_shape=shape)
            if probe["ok"]:
                tried = [d]
                break
            errors[d] = probe["error"]
        else:
            raise RuntimeError(f"ai_edge_litert cannot run {path}: "
                               + "; ".join(f"{d}: {e}" for d, e in errors.items()))
    for d in tried:
        try:
            it = make_interpreter(path, threads, d, input_shape=shape)
            got = run_tflite(it, images)
            break
        except RuntimeError as e:
            last = e
    else:
        raise RuntimeError(f"no interpreter ran {path}: {last}")
    diff = np.abs(got.reshape(ref.shape) - ref)
    norm = float(np.linalg.norm(ref))
    return dict(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        rel_l2=float(np.linalg.norm(diff) / norm) if norm else float("nan"),
        top1_agreement=float(np.mean(got.reshape(ref.shape).argmax(-1) == ref.argmax(-1))),
        n=int(len(images)),
        delegate=d,
    )


# -- static costs ------------------------------------------------------------------------------

_VIEW_OPS = {"Identity", "Reshape", "Squeeze", "ExpandDims", "Const", "Placeholder", "Shape",
             "StridedSlice", "Pack", "Cast", "NoOp", "ReadVariableOp", "VarHandleOp", "Prod",
             "GatherV2"}


def _static(shape) -> list[int] | None:
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None or any(d is None for d in dims):
        return None
    return dims


def static_costs(model, input_size: int, *, weight_bytes: int = 4,
                 activation_bytes: int = 4) -> dict:
    """Parameters, MACs and an estimate of memory traffic of one batch-1 inference.

    The model is traced at [1, S, S, 3] and frozen (functions inlined); MACs are counted on the
    TF graph, so every matrix product is included whatever layer made it: Conv2D
    (out_h*out_w*c_out*k_h*k_w*c_in/groups), DepthwiseConv2dNative (out elements * k_h*k_w),
    MatMul / BatchMatMul (batch*M*K*N: Dense, Dense on tokens via Tensordot, q·kᵀ and attn·v),
    Conv2DBackpropInput and Einsum. Element-wise ops are not counted as MACs.

    Memory traffic: `weight_bytes` per parameter, read once, plus every computed tensor
    (outputs of ops other than reshape-like views and constants) written once and read once at
    `activation_bytes` per element: an estimate for a runtime without fusion (fusion lowers it).

    Returns: dict(params, non_trainable_params, macs, macs_by_op, weight_bytes,
      activation_bytes, memory_traffic_bytes, input_size).
    """
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    from models.compat import tf

    s = int(input_size)
    spec = tf.TensorSpec([1, s, s, 3], tf.float32)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(fn)
    graph = frozen.graph
    macs_by_op: dict[str, int] = {}
    act_elems = 0

    def add(kind, n):
        macs_by_op[kind] = macs_by_op.get(kind, 0) + int(n)

    for op in graph.get_operations():
        outs = [_static(o.shape) for o in op.outputs]
        if op.type not in _VIEW_OPS and op.outputs and op.type != "Const":
            for o, dims in zip(op.outputs, outs):
                if dims is not None and o.dtype.is_floating:
                    act_elems += int(np.prod(dims))
        if op.type in ("Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput"):
            w = _static(op.inputs[1].shape)
            out = outs[0]
            if w is None or out is None:
                continue
            kh, kw = w[0], w[1]
            if op.type == "Conv2D":
                add("Conv2D", np.prod(out) * kh * kw * w[2])  # w[2] = c_in / groups
            elif op.type == "DepthwiseConv2dNative":
                add("DepthwiseConv2D", np.prod(out) * kh * kw)
            else:
                x = _static(op.inputs[2].shape)
                add("Conv2DTranspose", np.prod(x) * kh * kw * w[2])
        elif op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3", "BatchMatMul"):
            a, out = _static(op.inputs[0].shape), outs[0]
            if a is None or out is None:
                continue
            adj_a = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
            k = a[-2] if adj_a else a[-1]
            add(op.type.replace("V2", "").replace("V3", ""), np.prod(out) * k)
        elif op.type == "Einsum":
            eq = op.get_attr("equation").decode()
            ins, res = eq.replace(" ", "").split("->")
            sizes = {}
            for term, t in zip(ins.split(","), op.inputs):
                for ch, d in zip(term, _static(t.shape) or []):
                    sizes[ch] = d
            add("Einsum", np.prod([sizes[c] for c in set(ins.replace(",", ""))]))
    params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    non_trainable = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    w_bytes = params * weight_bytes
    a_bytes = act_elems * activation_bytes
    return dict(
        input_size=s,
        params=params,
        non_trainable_params=non_trainable,
        macs=int(sum(macs_by_op.values())),
        macs_by_op=macs_by_op,
        weight_bytes=int(w_bytes),
        activation_bytes=int(a_bytes),
        memory_traffic_bytes=int(w_bytes + 2 * a_bytes),
    )
