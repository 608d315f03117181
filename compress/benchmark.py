"""Measuring TFLite files: latency in a fresh process, top-1 through the interpreter, host facts.

The harness follows the method of TFLite's `benchmark_model` tool (warm-up runs, then at least
`runs` timed `invoke()` calls and at least `min_secs` seconds; see ../shared/reference/ECOSYSTEM.md
§C) but runs the Python `ai_edge_litert` interpreter, because the C++ binary is not shipped in any
PyPI wheel. Differences from `benchmark_model`:

- every configuration runs in a fresh Python process (this file run as a script, importing only
  numpy and ai_edge_litert, never TensorFlow), so one file's weight packing, allocator state or
  thread pool cannot leak into the next measurement, and the child's peak RSS is the file's;
- only `invoke()` is timed, with a fixed seeded input set once; the first call (delegate
  preparation, weight packing) is recorded separately as `first_invoke_ms`;
- a file the default interpreter cannot prepare (sparse int8 under XNNPACK in ai-edge-litert
  2.3.0: "failed to delegate FULLY_CONNECTED node") is not an error: the failure is recorded
  and the file is measured again without the default delegates, with the reason in `note`.

Numbers measured on an x86 host are labelled `host_figures=True`: XNNPACK's x86 int8 kernels and
fp16 (which runs as fp32 on x86) do not predict phone latency.

AMX. On an Intel CPU with AMX-INT8 (Sapphire Rapids and later; `amx_int8` in /proc/cpuinfo),
XNNPACK runs every int8 convolution and fully-connected op on AMX tiles (16x64 output tiles),
which is slower than its AVX512-VNNI kernels for the small channel counts of mobile models:
measured here, one thread, a 3x3 s2 3->16 stem at 256 px 0.65 ms with AMX vs 0.14 ms without, a
1x1 16->32 conv at 128x128 0.27 vs 0.11 ms, and mobilevit_xxs int8 7.6 vs 6.9 ms (loaded VM).
XNNPACK has no switch for this, but it only uses AMX after the kernel grants the process
permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); `measure_latency(..., deny_amx=True)` installs a
seccomp filter in the child that refuses that one request, so XNNPACK falls back to AVX512-VNNI,
the int8 path of CPUs without AMX (the AMD EPYC of the issues). Results say `amx`: `absent` (no
AMX on the CPU), `available` (XNNPACK may use it) or `denied`.

Command line (one measurement, JSON on stdout):

    python -m compress.benchmark FILE.tflite --threads=1 [--delegate=none] [--runs=50]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np

DELEGATES = ("xnnpack", "none")
RUNTIME = "ai_edge_litert"
_PACKAGES = ("tensorflow", "ai-edge-litert", "tf-keras", "tensorflow-model-optimization", "numpy")
_SEED = 0
_ISA_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve"}


# --------------------------------------------------------------------------- interpreter helpers


def _interpreter(path: str, threads: int, delegate: str):
    """An `ai_edge_litert` interpreter; `delegate='none'` turns the default XNNPACK off."""
    if delegate not in DELEGATES:
        raise ValueError(f"delegate must be one of {DELEGATES}, got {delegate!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = (
        OpResolverType.AUTO if delegate == "xnnpack" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    return Interpreter(model_path=path, num_threads=threads, experimental_op_resolver_type=resolver)


def _prepare(interp, input_size: int | None) -> None:
    """Resize dynamic inputs (before the first allocation, see STACK.md §2d) and allocate.

    A dynamic batch becomes 1; dynamic spatial dims of an NHWC input become `input_size`.
    """
    for d in interp.get_input_details():
        sig = [int(v) for v in d.get("shape_signature", d["shape"])]
        if -1 not in sig:
            continue
        shape = [1 if v == -1 else v for v in sig]
        if len(sig) == 4 and -1 in sig[1:3]:
            if input_size is None:
                raise ValueError(f"input {d['name']} has dynamic spatial dims {sig}; pass input_size")
            shape = [1, input_size, input_size, sig[3] if sig[3] > 0 else 3]
        interp.resize_tensor_input(d["index"], shape)
    interp.allocate_tensors()


def _random_input(detail: dict, rng: np.random.Generator) -> np.ndarray:
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


# --------------------------------------------------------------------------- latency


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    VmHWM from /proc/self/status: it belongs to the process image started by exec, whereas
    `getrusage().ru_maxrss` on Linux keeps the high-water mark inherited from the forking
    parent (a pytest or pipeline process with TensorFlow loaded reads ~700 MB there).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cpu_has_amx() -> bool:
    """True when /proc/cpuinfo lists AMX-INT8 (XNNPACK's AMX int8 kernels can run)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def _deny_amx() -> None:
    """Make this process's `arch_prctl(ARCH_REQ_XCOMP_PERM, ...)` fail with EPERM (seccomp), so
    that no library in it can enable AMX tiles; everything else is allowed. Linux x86-64 only."""
    import ctypes
    import struct

    def insn(code, jt, jf, k):  # struct sock_filter
        return struct.pack("HBBI", code, jt, jf, k)

    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET
    prog = b"".join([
        insn(ld_abs, 0, 0, 4), insn(jeq, 0, 5, 0xC000003E),  # seccomp_data.arch == x86_64
        insn(ld_abs, 0, 0, 0), insn(jeq, 0, 3, 158),         # .nr == SYS_arch_prctl
        insn(ld_abs, 0, 0, 16), insn(jeq, 0, 1, 0x1023),     # .args[0] == ARCH_REQ_XCOMP_PERM
        insn(ret, 0, 0, 0x00050000 | 1),                     # SECCOMP_RET_ERRNO | EPERM
        insn(ret, 0, 0, 0x7FFF0000),                         # SECCOMP_RET_ALLOW
    ])  # fmt: skip

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, needed without CAP_SYS_ADMIN
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def _amx_permission() -> bool:
    """Ask for AMX tile permission the way XNNPACK does; True when granted."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18, 0) == 0  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)


def _child_measure(
    path: str, threads: int, delegate: str, warmup: int, runs: int, min_secs: float, input_size,
    deny_amx: bool = False,
) -> dict:
    """The measurement itself; runs inside the fresh child process."""
    amx = "absent"
    if cpu_has_amx() and platform.machine() == "x86_64" and sys.platform == "linux":
        if deny_amx:
            _deny_amx()  # before ai_edge_litert (XNNPACK) is loaded
        amx = "available" if _amx_permission() else "denied"
    import ai_edge_litert

    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    interp = _interpreter(path, threads, delegate)
    _prepare(interp, input_size)
    init_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(_SEED)
    inputs = interp.get_input_details()
    for d in inputs:
        interp.set_tensor(d["index"], _random_input(d, rng))
    t0 = time.perf_counter()
    interp.invoke()
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(0, warmup)):
        interp.invoke()
    times = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start) < min_secs:
        t0 = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    summary = delegation_summary(interp)
    return {
        "path": path,
        "threads": threads,
        "delegate": delegate,
        "runtime": RUNTIME,
        "runtime_version": getattr(ai_edge_litert, "__version__", "unknown"),
        "latency_p50_ms": float(np.percentile(t, 50)),
        "latency_p90_ms": float(np.percentile(t, 90)),
        "latency_p99_ms": float(np.percentile(t, 99)),
        "latency_mean_ms": float(t.mean()),
        "latency_std_ms": float(t.std(ddof=1)) if len(t) > 1 else 0.0,
        "latency_min_ms": float(t.min()),
        "first_invoke_ms": first_ms,
        "init_ms": init_ms,
        "warmup": int(warmup),
        "runs": int(len(t)),
        "input_shapes": [list(map(int, d["shape"])) for d in inputs],
        "input_dtypes": [np.dtype(d["dtype"]).name for d in inputs],
        "partitions": summary["partitions"],
        "undelegated_ops": summary["undelegated_ops"],
        "op_counts": summary["op_counts"],
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_mb": rss_before,
        "pid": os.getpid(),
        "amx": amx,
    }


def _run_child(args: dict, timeout: float) -> dict:
    """Run `_child_measure(**args)` in a fresh interpreter; errors come back as {'error': ...}."""
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        out = os.path.join(tmp, "result.json")
        # -I: isolated mode, so the script's folder (compress/) is not put on sys.path and no
        # package __init__ (which may import TensorFlow) runs in the child.
        cmd = [sys.executable, "-I", os.path.abspath(__file__), "--child", json.dumps(args), out]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        return {"error": f"child exited with code {proc.returncode}: " + " | ".join(tail)}


def measure_latency(
    path: str,
    *,
    threads: int,
    delegate: str = "xnnpack",
    warmup: int = 10,
    runs: int = 50,
    input_size: int | None = None,
    min_secs: float = 1.0,
    timeout: float = 900.0,
    fallback: bool = True,
    repeats: int = 1,
    deny_amx: bool = False,
) -> dict:
    """Time `invoke()` of a .tflite file in a fresh process. Never raises for a file that fails.

    Args:
      path: the .tflite file.
      threads: interpreter threads (>= 1).
      delegate: 'xnnpack' (the default interpreter, XNNPACK applied) or 'none' (no default
        delegates).
      warmup: untimed invokes after the first one.
      runs: minimum number of timed invokes.
      input_size: square size used to resize a file with dynamic spatial input dims.
      min_secs: keep timing until at least this many seconds have passed (benchmark_model: 1 s).
      timeout: seconds before the child is killed.
      fallback: when the requested interpreter cannot prepare or run the file, measure it again
        without the default delegates and say so in `note`.
      repeats: fresh processes per measurement; the latency figures are then the medians over
        processes (`latency_p50_ms_repeats` lists each process's p50, `pids` their ids).
      deny_amx: refuse AMX to the child (module doc), so XNNPACK's int8 runs on AVX512-VNNI.

    Returns:
      A dict with latency_p50_ms, latency_p90_ms, latency_p99_ms, latency_mean_ms, latency_std_ms,
      latency_min_ms, first_invoke_ms, init_ms, runs, warmup, peak_rss_mb, runtime,
      runtime_version, partitions, undelegated_ops ({op: count}), op_counts, pid (the child's),
      amx ('absent', 'available' or 'denied'),
      `delegate` (what was asked), `measured_delegate` (what ran), `error` (None or the failure
      of the requested interpreter) and `note`. Latencies are NaN when nothing could run the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    if delegate not in DELEGATES:
        raise ValueError(f"delegate must be one of {DELEGATES}, got {delegate!r}")
    args = dict(
        path=os.path.abspath(path),
        threads=int(threads),
        warmup=int(warmup),
        runs=int(runs),
        min_secs=float(min_secs),
        input_size=input_size,
        deny_amx=bool(deny_amx),
    )
    result = _run_child({**args, "delegate": delegate}, timeout)
    if "error" not in result:
        result = _repeat(result, {**args, "delegate": delegate}, repeats, timeout)
        return {**result, "measured_delegate": delegate, "error": None, "note": ""}
    error = result["error"]
    if fallback and delegate != "none":
        again = _run_child({**args, "delegate": "none"}, timeout)
        if "error" not in again:
            again = _repeat(again, {**args, "delegate": "none"}, repeats, timeout)
            note = (
                f"{RUNTIME} with XNNPACK could not run the file ({_short(error)}); "
                "measured with BUILTIN_WITHOUT_DEFAULT_DELEGATES"
            )
            return {
                **again,
                "delegate": delegate,
                "measured_delegate": "none",
                "runtime": f"{RUNTIME}[no_default_delegates]",
                "error": error,
                "note": note,
            }
        error = f"{error}; without default delegates: {again['error']}"
    nan = float("nan")
    return {
        "path": os.path.abspath(path),
        "threads": int(threads),
        "delegate": delegate,
        "measured_delegate": None,
        "runtime": None,
        "runtime_version": None,
        **{f"latency_{k}_ms": nan for k in ("p50", "p90", "p99", "mean", "std", "min")},
        "first_invoke_ms": nan,
        "peak_rss_mb": nan,
        "partitions": None,
        "undelegated_ops": {},
        "amx": None,
        "error": error,
        "note": f"no runtime could run the file: {_short(error)}",
    }


def _repeat(first: dict, args: dict, repeats: int, timeout: float) -> dict:
    """Measure `repeats - 1` more times in fresh processes and take medians of the figures."""
    results = [first]
    for _ in range(max(1, repeats) - 1):
        r = _run_child(args, timeout)
        if "error" in r:
            break
        results.append(r)
    out = dict(first)
    for k in first:
        if k.startswith("latency_") or k in ("first_invoke_ms", "init_ms"):
            out[k] = float(np.median([r[k] for r in results]))
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    out["runs"] = int(sum(r["runs"] for r in results))
    out["repeats"] = len(results)
    out["latency_p50_ms_repeats"] = [r["latency_p50_ms"] for r in results]
    out["pids"] = [r["pid"] for r in results]
    return out


def _short(msg: str, limit: int = 200) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------- accuracy


def _to_numpy(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


class _Runner:
    """One interpreter that takes float images one at a time (quantizing int inputs)."""

    def __init__(self, path: str, threads: int, delegate: str):
        self.path, self.threads, self.delegate = path, threads, delegate
        self.interp = _interpreter(path, threads, delegate)
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
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
        x = image[None]
        dtype = np.dtype(self.inp["dtype"])
        if dtype.kind in "iu":
            scale, zero = self.inp["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.interp.set_tensor(self.inp["index"], x.astype(dtype))
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])[0]
        if np.dtype(self.out["dtype"]).kind in "iu":
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * (scale or 1.0)
        return y


def evaluate_tflite(
    path: str,
    dataset: Iterable,
    *,
    threads: int = 2,
    delegate: str = "xnnpack",
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Top-1 of a .tflite file over (float32 images [b, s, s, 3], int labels) batches.

    Images go through the interpreter one at a time (the batch dimension of exported files is 1).
    int8/uint8 inputs are quantized with the file's input scale and zero point. If the requested
    interpreter cannot run the file, the file is evaluated without the default delegates and
    `note` says so.

    Returns:
      {'top1', 'n', 'predictions' (int array, one per image, in dataset order), 'labels',
       'runtime', 'delegate', 'note'}.
    """
    from tqdm.auto import tqdm

    note = ""
    runner = _Runner(path, threads, delegate)
    preds: list[int] = []
    labels: list[int] = []
    bar = tqdm(desc=f"eval {os.path.basename(path)}", unit="img", disable=not progress, total=limit)
    try:
        for batch in dataset:
            images, ys = batch[0], batch[1]
            images = _to_numpy(images).astype(np.float32)
            ys = _to_numpy(ys).reshape(-1)
            for image, y in zip(images, ys):
                if limit is not None and len(preds) >= limit:
                    break
                try:
                    logits = runner(image)
                except RuntimeError as e:
                    if runner.delegate == "none" or preds:
                        raise
                    note = (
                        f"{RUNTIME} with XNNPACK could not run the file ({_short(e)}); "
                        "evaluated with BUILTIN_WITHOUT_DEFAULT_DELEGATES"
                    )
                    runner = _Runner(path, threads, "none")
                    logits = runner(image)
                preds.append(int(np.argmax(logits)))
                labels.append(int(y))
                bar.update(1)
            if limit is not None and len(preds) >= limit:
                break
    finally:
        bar.close()
    p, y = np.asarray(preds, np.int64), np.asarray(labels, np.int64)
    return {
        "top1": float((p == y).mean()) if len(p) else float("nan"),
        "n": int(len(p)),
        "predictions": p,
        "labels": y,
        "runtime": RUNTIME if runner.delegate == delegate else f"{RUNTIME}[no_default_delegates]",
        "delegate": runner.delegate,
        "note": note,
    }


def keras_predictions(model, dataset: Iterable, *, limit: int | None = None) -> np.ndarray:
    """Top-1 class of a Keras model for every image of `dataset`, in order (for `agreement`)."""
    preds: list[int] = []
    for batch in dataset:
        images = _to_numpy(batch[0]).astype(np.float32)
        logits = model(images, training=False)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        preds.extend(int(i) for i in np.argmax(_to_numpy(logits), axis=-1))
        if limit is not None and len(preds) >= limit:
            return np.asarray(preds[:limit], np.int64)
    return np.asarray(preds, np.int64)


def agreement(predictions_a, predictions_b) -> float:
    """Fraction of images where two prediction arrays agree (the arrays must match in length)."""
    a, b = np.asarray(predictions_a), np.asarray(predictions_b)
    if a.shape != b.shape:
        raise ValueError(f"prediction arrays differ in shape: {a.shape} vs {b.shape}")
    return float((a == b).mean()) if a.size else float("nan")


# --------------------------------------------------------------------------- host facts


def file_sizes(path: str) -> dict:
    """Raw and gzip (level 9) size of a file, the usual proxy for download size."""
    with open(path, "rb") as f:
        data = f.read()
    return {"size_bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9))}


def machine_info() -> dict:
    """CPU, core count and package versions of this host, labelled as host figures."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    ident, isa = {}, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if key in ("model name", "hardware", "cpu model") and "name" not in ident:
                    cpu = ident["name"] = value
                elif key in ("vendor_id", "cpu family", "model", "stepping") and key not in ident:
                    ident[key] = value
                elif key == "flags" and not isa:
                    isa = sorted(set(value.split()) & _ISA_FLAGS)
                elif not line.strip() and ident:
                    break  # the first processor is enough
    except OSError:
        pass
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "system": f"{platform.system()} {platform.release()}",
        "amx_int8": cpu_has_amx(),
        # family/model tell CPU generations apart (AMD family 25 = Zen 3/4, 26 = Zen 5); the ISA
        # flags are the ones XNNPACK picks its x86 kernels by
        "cpu_vendor": ident.get("vendor_id"),
        "cpu_family": ident.get("cpu family"),
        "cpu_model": ident.get("model"),
        "isa": isa,
        "python": platform.python_version(),
        "packages": versions,
        "host_figures": True,
        "label": (
            f"host figures ({platform.machine()}, {cpu}"
            + (f", family {ident['cpu family']} model {ident.get('model')}"
               if "cpu family" in ident else "")
            + "): not phone figures; XNNPACK x86 int8 "
            "kernels and fp16-as-fp32 differ from ARM"
        ),
    }


# --------------------------------------------------------------------------- the floor

# 1x1 convolutions C -> C over [1, S, S, C], 205 M MACs each: the shapes at which XNNPACK's GEMM
# kernels reach their peak on this kind of host (measured: 56x56x128 and 112x112x64 run at 80%
# and 65% of it in int8).
CEILING_SHAPES = ((56, 256), (28, 512), (14, 1024))


def _ceiling_file(path: str, side: int, channels: int, fmt: str) -> None:
    """A one-op file: 1x1 conv (bias) on [1, side, side, channels]; int8 with int8 input and
    output so that only the GEMM is timed."""
    from models.compat import keras, tf

    rng = np.random.default_rng(_SEED)
    inputs = keras.Input((side, side, channels))
    conv = keras.layers.Conv2D(channels, 1)
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([rng.normal(0, channels ** -0.5, (1, 1, channels, channels)).astype("float32"),
                      np.zeros(channels, "float32")])
    spec = tf.TensorSpec([1, side, side, channels], tf.float32)
    fn = tf.function(lambda x: model(x), input_signature=[spec], autograph=False)
    conv_ = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    if fmt == "int8":
        calib = [rng.uniform(-1, 1, (1, side, side, channels)).astype("float32") for _ in range(4)]
        conv_.optimizations = [tf.lite.Optimize.DEFAULT]
        conv_.representative_dataset = lambda: ([c] for c in calib)
        conv_.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv_.inference_input_type = conv_.inference_output_type = tf.int8
    data = conv_.convert()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def gemm_ceiling(
    outdir: str,
    *,
    threads: Sequence[int] = (1,),
    runs: int = 30,
    min_secs: float = 0.5,
    deny_amx: bool = False,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """This host's measured GEMM throughput under XNNPACK: the best over `shapes` of one-op
    files (1x1 conv, C -> C), each timed like any other file (fresh process, p50).

    The floor of a model is then 2 * MACs / throughput: no implementation of its matrix products
    runs faster on this host, whatever it does with the rest (element-wise ops, softmax, data
    movement, which the floor leaves out).

    Returns {threads: {"fp32_gflops", "int8_gops", "by_shape": {"SxSxC": {"fp32", "int8"}}}}
    (GFLOP/s and GOP/s, 2 ops per MAC); files are kept in `outdir` and reused.
    """
    os.makedirs(outdir, exist_ok=True)
    shapes = CEILING_SHAPES if shapes is None else shapes
    out: dict = {}
    for t in threads:
        best = {"fp32": 0.0, "int8": 0.0}
        by_shape = {}
        for side, c in shapes:
            key = f"{side}x{side}x{c}"
            by_shape[key] = {}
            for fmt in ("fp32", "int8"):
                path = os.path.join(outdir, f"conv1x1_{key}.{fmt}.tflite")
                if not os.path.exists(path):
                    _ceiling_file(path, side, c, fmt)
                lat = measure_latency(path, threads=int(t), runs=runs, min_secs=min_secs,
                                      fallback=False, deny_amx=deny_amx)
                rate = 2.0 * side * side * c * c / (lat["latency_p50_ms"] * 1e-3) / 1e9
                rate = 0.0 if rate != rate else rate  # NaN: the file could not run
                by_shape[key][fmt] = round(rate, 1)
                best[fmt] = max(best[fmt], rate)
        out[int(t)] = {"fp32_gflops": round(best["fp32"], 1), "int8_gops": round(best["int8"], 1),
                       "by_shape": by_shape}
    return out


def floor_ms(macs: int | None, fmt: str, ceiling: dict | None) -> float | None:
    """2 * MACs at the host's GEMM ceiling (`gemm_ceiling()[threads]`), in ms: fp32 and fp16
    files (fp16 computes in fp32 on x86) use the float ceiling, int8 and drq files the int8 one."""
    if not macs or not ceiling:
        return None
    rate = ceiling["int8_gops"] if fmt in ("int8", "drq", "int8_sparse", "int16x8") \
        else ceiling["fp32_gflops"]
    return 2.0 * macs / (rate * 1e9) * 1e3 if rate else None


# --------------------------------------------------------------------------- a workdir


def benchmark_files(
    workdir: str,
    files: Sequence[str] | None = None,
    *,
    threads: Sequence[int] = (1,),
    delegates: Sequence[str] = ("xnnpack",),
    warmup: int = 10,
    runs: int = 50,
    min_secs: float = 1.0,
    repeats: int = 1,
    input_size: int | None = None,
    dataset: Iterable | None = None,
    reference_predictions: Callable[[str], np.ndarray | None] | None = None,
    file_info: Callable[[str], dict] | None = None,
    eval_threads: int = 2,
    eval_limit: int | None = None,
    resume: bool = True,
    deny_amx: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Measure TFLite files of a workdir and write `<workdir>/results.csv` row by row.

    Args:
      workdir: the pipeline workdir; `files` default to `<workdir>/export/*.tflite`.
      threads, delegates: every combination is a row.
      warmup, runs, min_secs, repeats: see `measure_latency`.
      input_size: the files' square input size (needed for dynamic-shape files; recorded).
      dataset: validation batches for `top1` (evaluated once per file, copied to its rows).
      reference_predictions: path -> the Keras model's top-1 per image of `dataset` (e.g. the
        file's stage model), for `agreement`; None leaves it empty.
      file_info: path -> extra columns of the file (`params`, `macs`, `sparsity`, `model`,
        `stage`, `format`, `note`, `prune_method`, `kept_fraction`, ...).
      resume: skip (path, threads, delegate) rows already in results.csv.
      deny_amx: time every file with AMX refused to XNNPACK (`measure_latency`; column `amx`).

    Returns:
      The rows written in this call.
    """
    import glob

    from compress import results as res

    files = sorted(files if files is not None else glob.glob(os.path.join(workdir, "export", "*.tflite")))
    machine = machine_info()
    done = set()
    if resume and os.path.exists(res.results_path(workdir)):
        done = {res._key(r, res.KEY) for r in res.read_results(workdir)}
    try:
        from compress.audit import audit_tflite
    except ImportError:
        audit_tflite = None
    written = []
    for path in files:
        rel = os.path.relpath(path, workdir)
        todo = [
            (t, d) for d in delegates for t in threads
            if res._key({"path": rel, "threads": t, "delegate": d}, res.KEY) not in done
        ]  # fmt: skip
        if not todo:
            log(f"{rel}: already measured")
            continue
        info = dict(file_info(path)) if file_info else {}
        audit = {}
        if audit_tflite is not None:
            try:
                audit = dict(audit_tflite(path))
            except Exception as e:  # the timing still counts
                info["note"] = "; ".join(filter(None, [info.get("note"), f"audit failed: {e}"]))
        evaluation, agree = None, None
        if dataset is not None:
            # evaluation runs in this process: a file that aborts XNNPACK (it can, STACK §2d;
            # the audit probes it in a child) is scored without the delegate instead
            runnable = audit.get("runnable") or {}
            if "xnnpack" not in runnable:
                from compress.audit import probe_delegation_isolated

                runnable = {"xnnpack": probe_delegation_isolated(path, 1, "xnnpack")["ok"]}
            eval_delegate = "xnnpack" if runnable["xnnpack"] else "none"
            evaluation = evaluate_tflite(path, dataset, threads=eval_threads, limit=eval_limit,
                                         delegate=eval_delegate)
            if eval_delegate == "none":
                info["note"] = "; ".join(filter(None, [
                    info.get("note"), "XNNPACK cannot prepare the file: top-1 without it"]))
            ref = reference_predictions(path) if reference_predictions else None
            if ref is not None:
                agree = agreement(evaluation["predictions"], np.asarray(ref)[: evaluation["n"]])
        for t, d in todo:
            lat = measure_latency(
                path, threads=t, delegate=d, warmup=warmup, runs=runs, min_secs=min_secs,
                input_size=input_size, repeats=repeats, deny_amx=deny_amx,
            )  # fmt: skip
            kw = {k: info[k] for k in ("model", "stage", "format", "params", "macs", "sparsity",
                                       "memory_traffic_bytes") if k in info}
            row = res.make_row(
                path, lat, workdir=workdir, input_size=input_size or info.get("input_size"),
                audit=audit, evaluation=evaluation, agreement=agree, machine=machine,
                note=info.get("note", ""), **kw,
            )  # fmt: skip
            row.update({k: info[k] for k in ("prune_method", "kept_fraction") if k in info})
            res.write_results(workdir, [row], machine=machine)
            written.append(row)
            log(f"{rel} threads={t} {d}: p50 {lat['latency_p50_ms']:.3f} ms")
    return written


# --------------------------------------------------------------------------- command line


def _main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "--child":
        args, out = json.loads(argv[1]), argv[2]
        try:
            result = _child_measure(**args)
        except Exception as e:  # the parent decides what to do with any failure
            result = {"error": f"{type(e).__name__}: {e}"}
        with open(out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(out + ".tmp", out)
        return 0
    p = argparse.ArgumentParser(prog="python -m compress.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--delegate", choices=DELEGATES, default="xnnpack")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--min_secs", type=float, default=1.0)
    p.add_argument("--input_size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--deny_amx", action="store_true", help="refuse AMX to XNNPACK (module doc)")
    a = p.parse_args(argv)
    r = measure_latency(
        a.path,
        threads=a.threads,
        delegate=a.delegate,
        warmup=a.warmup,
        runs=a.runs,
        min_secs=a.min_secs,
        input_size=a.input_size,
        repeats=a.repeats,
        deny_amx=a.deny_amx,
    )
    print(json.dumps({**r, "machine": machine_info()}, indent=2, default=str))
    return 0 if r["error"] is None or r["measured_delegate"] else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
