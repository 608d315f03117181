"""The project's one way to build and run an `ai_edge_litert` interpreter.

* `make_interpreter(path, threads, delegate)`: the XNNPACK default delegate or none; dynamic
  inputs resized before the first `allocate_tensors`.
* `set_input` / `get_output`: float in and out whatever the file's I/O type (int8 and int16
  tensors are quantized and dequantized with the file's scale and zero point); `run_tflite` runs
  a batch of images through a batch-1 file; `ImageRunner` feeds images one at a time and
  resizes a dynamic input to each image's size.
* `delegation_summary(interp)` (partitions and undelegated ops of an allocated interpreter, read
  from its graph) and `probe_delegation` (the same, from a second interpreter without delegate
  node fusion, plus whether the file runs), and `probe_delegation_isolated`, which probes in a
  child process because running a file can abort the process (16x8 files with LayerNorm
  SIGABRT in `allocate_tensors` in ai-edge-litert 2.3.0).

Imports only NumPy and ai_edge_litert (never TensorFlow): the fresh measuring processes of
`compress.measure.latency` use it.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from compress.child import run_in_child

DELEGATES = ("xnnpack", "none")
RUNTIME = "ai_edge_litert"


def _interp_module():
    from ai_edge_litert import interpreter  # imported lazily: light, but not needed to parse

    return interpreter


def make_interpreter(path, threads: int = 1, delegate: str = "xnnpack", *, input_shape=None,
                     input_size: int | None = None, allocate: bool = True,
                     disable_delegate_node_fusion: bool = False):
    """Builds an `ai_edge_litert.interpreter.Interpreter` for a .tflite file.

    Args:
      path: file path, or the model's bytes.
      threads: `num_threads` (>= 1).
      delegate: "xnnpack" (the default XNNPACK delegate, as `Interpreter()` applies it) or
        "none" (`OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`, the builtin kernels).
      input_shape: shape to give a dynamic input (shape signature with -1), e.g. [1, 256, 256, 3];
        applied with `resize_tensor_input` *before* the first `allocate_tensors` (a dynamic file
        allocated at its placeholder shape [1, 1, 1, 3] fails, STACK §2d). Must equal a static
        input's shape.
      input_size: instead of `input_shape`: a dynamic batch becomes 1 and dynamic spatial dims
        of an NHWC input become `input_size`. A dynamic input needs one of the two to allocate.
      allocate: call `allocate_tensors()` (this is when XNNPACK is applied and may fail).
      disable_delegate_node_fusion: one DELEGATE node per delegated op (for auditing only).
    Returns: the interpreter, tensors allocated when `allocate`.
    Raises:
      ValueError: unknown delegate, or a dynamic input without `input_shape`.
      RuntimeError: from ai_edge_litert when the file cannot be prepared.
    """
    if delegate not in DELEGATES:
        raise ValueError(f"delegate must be one of {DELEGATES}, got {delegate!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
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
        sig = [int(s) for s in d.get("shape_signature", d["shape"])]
        if any(s < 0 for s in sig):
            shape = input_shape
            if shape is None and (input_size is not None or -1 not in sig[1:3]):
                shape = [1 if s < 0 else s for s in sig]
                if len(sig) == 4 and -1 in sig[1:3]:
                    shape = [1, input_size, input_size, sig[3] if sig[3] > 0 else 3]
            if shape is None:
                if not allocate:
                    continue  # the caller resizes before allocating (ImageRunner)
                raise ValueError(f"input {d['name']!r} has dynamic shape {sig}: pass input_shape "
                                 "or input_size")
            it.resize_tensor_input(d["index"], list(shape), strict=False)
        elif input_shape is not None and list(input_shape) != list(d["shape"]):
            raise ValueError(f"static input {d['name']!r} has shape {list(d['shape'])}, "
                             f"not {list(input_shape)}")
    if allocate:
        it.allocate_tensors()
    return it


def set_input(it, x: np.ndarray) -> None:
    d = it.get_input_details()[0]
    if d["dtype"] in (np.int8, np.uint8, np.int16):
        scale, zp = d["quantization"]
        info = np.iinfo(d["dtype"])
        x = np.clip(np.round(x / scale + zp), info.min, info.max)
    it.set_tensor(d["index"], x.astype(d["dtype"]))


def get_output(it) -> np.ndarray:
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
        set_input(it, np.asarray(x, np.float32)[None])
        it.invoke()
        outs.append(get_output(it)[0])
    return np.stack(outs)


def random_input(detail: dict, rng: np.random.Generator) -> np.ndarray:
    """A random tensor of the input's shape and dtype (uniform over the dtype's useful range)."""
    shape, dtype = tuple(detail["shape"]), np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -128), min(info.max, 255)
        return rng.integers(lo, hi + 1, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    raise ValueError(f"unsupported input dtype {dtype}")


class ImageRunner:
    """One interpreter that takes float images one at a time; a dynamic input is resized to each
    image's size (reallocating only when the size changes)."""

    def __init__(self, path: str, threads: int, delegate: str):
        self.path, self.threads, self.delegate = path, threads, delegate
        self.interp = make_interpreter(path, threads, delegate, allocate=False)
        self.inp = self.interp.get_input_details()[0]
        sig = list(self.inp.get("shape_signature", self.inp["shape"]))
        self.dynamic = any(v == -1 for v in sig[1:3])
        self.shape = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        shape = (1, *image.shape)
        if self.shape != shape:
            if self.dynamic or tuple(int(v) for v in self.inp["shape"]) != shape:
                self.interp.resize_tensor_input(self.inp["index"], list(shape))
            self.interp.allocate_tensors()
            self.shape = shape
        set_input(self.interp, image[None])
        self.interp.invoke()
        return get_output(self.interp)[0]


def delegation_summary(interp) -> dict:
    """Partitions and undelegated ops of an allocated interpreter.

    `_get_ops_details()` lists the original nodes *and* the DELEGATE nodes that replaced some of
    them. A DELEGATE node's inputs and outputs are its partition's boundary tensors, so the
    partition is the set of original nodes reachable backwards from its outputs without crossing
    its inputs (XNNPACK partitions are convex).
    """
    ops = interp._get_ops_details()
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    originals = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {}
    for o in originals:
        for t in o["outputs"]:
            producer[int(t)] = o["index"]
    by_index = {o["index"]: o for o in originals}
    delegated: set[int] = set()
    for d in delegates:
        boundary = {int(t) for t in d["inputs"]}
        stack = [int(t) for t in d["outputs"]]
        seen: set[int] = set()
        while stack:
            t = stack.pop()
            if t in seen or t in boundary or t < 0 or t not in producer:
                continue
            seen.add(t)
            node = producer[t]
            if node in delegated:
                continue
            delegated.add(node)
            stack.extend(int(x) for x in by_index[node]["inputs"])
    undelegated = Counter(o["op_name"] for o in originals if o["index"] not in delegated)
    return {
        "partitions": len(delegates),
        "undelegated_ops": dict(sorted(undelegated.items())),
        "op_counts": dict(sorted(Counter(o["op_name"] for o in originals).items())),
    }


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


def probe_delegation_isolated(path, threads: int = 1, delegate: str = "xnnpack", *,
                              input_shape=None, timeout: float = 300) -> dict:
    """`probe_delegation` in a child process: an abort (SIGABRT) is reported, not suffered."""
    args = dict(path=os.path.abspath(os.fspath(path)), threads=threads, delegate=delegate,
                input_shape=None if input_shape is None else [int(s) for s in input_shape])
    out = run_in_child("compress.tflite.interpreter:probe_delegation", args, timeout=timeout)
    if "ok" not in out:  # the process died or timed out
        out = dict(delegate=delegate, ok=False, error=f"interpreter {out['error']}",
                   partitions=0, undelegated_ops={}, undelegated_detail={})
    return out
