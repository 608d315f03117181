"""Audit of .tflite files: what is in a file, what XNNPACK takes of it, and Keras parity.

* `audit_tflite(path)`: op counts by type and by output dtype, Flex/custom ops, float heavy ops,
  XNNPACK partitions and the ops left outside the delegate, whether ai_edge_litert can run the
  file with XNNPACK or only without default delegates, and the sparsity of the prunable weights.
* `parity(model, path, images)`: Keras-vs-TFLite max |diff| and top-1 agreement.

How delegation is measured: `_get_ops_details()` lists the graph's nodes and then the DELEGATE
nodes. The number of partitions is the number of DELEGATE nodes with the default node fusion;
which ops a delegate took is read from a second interpreter built with
`experimental_disable_delegate_node_fusion=True`, where every delegated op gets its own DELEGATE
node with exactly that op's outputs. Running a file can abort the process (16x8 files with
LayerNorm SIGABRT in `allocate_tensors` in ai-edge-litert 2.3.0), so `audit_tflite` probes in a
child process by default and reports a crash instead of dying with it.
"""

from __future__ import annotations

import os

import numpy as np

from compress.io import file_sizes
from compress.tflite.flatbuffer import TFLiteFile, op_counts
from compress.tflite.interpreter import make_interpreter, probe_delegation, probe_delegation_isolated, run_tflite


HEAVY_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL",
             "TRANSPOSE_CONV", "CONV_3D")


FLOAT_DTYPES = ("FLOAT32", "FLOAT16")


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
        **file_sizes(raw),
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
