"""Latency of a TFLite file, timed in a fresh process.

The harness follows the method of TFLite's `benchmark_model` tool (warm-up runs, then at least
`runs` timed `invoke()` calls and at least `min_secs` seconds) but runs the Python
`ai_edge_litert` interpreter, because the C++ binary is not shipped in any PyPI wheel.
Differences from `benchmark_model`:

- every configuration runs in a fresh Python process (`compress.child.run_in_child`; this module
  and what it imports load only numpy and ai_edge_litert, never TensorFlow), so one file's weight packing, allocator state or
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
the int8 path of CPUs without AMX (e.g. AMD EPYC). Results say `amx`: `absent` (no
AMX on the CPU), `available` (XNNPACK may use it) or `denied`.

Command line (one measurement, JSON on stdout):

    python -m compress.measure.latency FILE.tflite --threads=1 [--delegate=none] [--runs=50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from compress.child import run_in_child
from compress.measure.host import cpu_has_amx, machine_info
from compress.tflite.interpreter import DELEGATES, RUNTIME, delegation_summary, make_interpreter, random_input

_SEED = 0


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


def child_measure(
    path: str, threads: int, delegate: str, warmup: int, runs: int, min_secs: float, input_size,
    deny_amx: bool = False,
) -> dict:
    """The measurement itself; runs inside the fresh child process (`measure_latency`)."""
    amx = "absent"
    if cpu_has_amx() and platform.machine() == "x86_64" and sys.platform == "linux":
        if deny_amx:
            _deny_amx()  # before ai_edge_litert (XNNPACK) is loaded
        amx = "available" if _amx_permission() else "denied"
    import ai_edge_litert

    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    interp = make_interpreter(path, threads, delegate, input_size=input_size)
    init_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(_SEED)
    inputs = interp.get_input_details()
    for d in inputs:
        interp.set_tensor(d["index"], random_input(d, rng))
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
                f"{RUNTIME} with XNNPACK could not run the file ({short(error)}); "
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
        "note": f"no runtime could run the file: {short(error)}",
    }


def _run_child(args: dict, timeout: float) -> dict:
    return run_in_child("compress.measure.latency:child_measure", args, timeout=timeout)


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


def short(msg: str, limit: int = 200) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.measure.latency", description=__doc__.split("\n")[0])
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
