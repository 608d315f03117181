"""Where a .tflite file's time goes under XNNPACK: one thread's invoke loop sampled with Linux
`perf`, the samples grouped by XNNPACK kernel family, in ms per invoke.

    python scripts/profile_tflite.py runs/bench/mobile_former_294m.bench.fp32.tflite \
        runs/bench/mobile_former_294m.bench.int8.tflite [--invokes=1000]

The interpreter has no per-op profiler in Python, but XNNPACK's micro-kernels keep their symbol
names in ai-edge-litert's shared library (`xnn_qs8_qc8w_gemm_minmax_fp32_ukernel_7x16c8__avx512vnni`,
`xnn_f32_raddstoreexpminusmax_ukernel__avx512f...`), and the name says what runs: GEMMs of
1x1 convolutions and fully-connected layers, their int8 or float kind, depthwise convolutions,
softmax, element-wise products, packing of a dynamic BATCH_MATMUL operand, conversions. Each
file runs in its own `perf record` child (cpu-clock sampling, no hardware counters needed); the
share of samples of each family times the loop's own p50 gives the ms. Only samples in the LiteRT
library (and the libc copies it calls) count: Python, NumPy, the loader and the kernel are left
out; weight packing at the first invoke is a negligible share of the default 1000 invokes. Needs `perf` (Debian: linux-perf) and `kernel.perf_event_paranoid` <= 2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compress.child import run_in_child  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Only when run as a script: tests import this module beside bench_tflite, whose flags
    share absl's global registry (a second --threads would clash)."""
    flags.DEFINE_integer("invokes", 1000, "Timed invokes per file (after 10 warm-ups).")
    flags.DEFINE_integer("threads", 1, "Interpreter threads.")

# (family, regular expression on the symbol), first match wins.
FAMILIES = (
    ("pack (dynamic BATCH_MATMUL operand)", r"pack"),
    ("gemm f32 (1x1 conv, FC, BMM)", r"f32_gemm"),
    ("igemm f32 (kxk conv, dw multiplier)", r"f32_igemm"),
    ("gemm int8", r"qs8.*_gemm|qd8.*_gemm"),
    ("igemm int8", r"qs8.*_igemm|qd8.*_igemm"),
    ("depthwise conv", r"dwconv"),
    ("softmax", r"raddstoreexpminusmax|_rmax_|compute_reciprocal|floating_point_softmax"),
    ("mul", r"_vmul"),
    ("add / sub", r"_vadd|_vsub|_vrsub"),
    ("transpose / copy", r"transpose|copy|memmove|memcpy"),
    ("quantize / dequantize", r"vcvt"),
    ("pad", r"_pad"),
    ("reduce", r"rsum|rdsum|reduce|rminmax"),
    ("lookup table (int8 sigmoid, ...)", r"_lut_"),
    ("other element-wise", r"vclamp|vsigmoid|vgelu|vrsqrt|vsqr|vlrelu|vhswish|vtanh|vsqrt|vexp"),
    ("runtime", r"xnn_run_operator|invoke_runtime|pthreadpool|xnn_compute|memset"),
)
_DROPPED = re.compile(r"blas_thread|^_?Py|gc_collect|unicodekeys|visit_")

def family(symbol: str) -> str | None:
    """The kernel family of a sampled symbol, None for samples outside the interpreter's work."""
    if _DROPPED.search(symbol):
        return None
    return next((name for name, rx in FAMILIES if re.search(rx, symbol)), "other")


def _kept(dso: str, symbol: str) -> bool:
    """Samples of the interpreter's work: the LiteRT library (XNNPACK inside it) and the libc
    memory routines its copies call; not Python, NumPy, the loader or the kernel."""
    return "litert" in dso.lower() or (dso.startswith("libc") and symbol.startswith("__mem"))


def parse_report(text: str) -> dict[str, float]:
    """`perf report --stdio --sort dso,symbol` -> {family: share of the kept samples}."""
    shares: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(\S+)", line)
        if m and _kept(m[2], m[3]) and (fam := family(m[3])) is not None:
            shares[fam] = shares.get(fam, 0.0) + float(m[1])
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()} if total else {}


def profile(path: str, *, invokes: int = 1000, threads: int = 1) -> tuple[float, dict[str, float]]:
    """(p50 ms of the loop, {family: ms per invoke}) for one file."""
    if shutil.which("perf") is None:
        raise RuntimeError("perf is not installed (Debian: apt-get install linux-perf)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such .tflite file: {path}")
    with tempfile.TemporaryDirectory(prefix="profile_") as tmp:
        data = os.path.join(tmp, "perf.data")
        # the project's timed loop (a fresh process without TensorFlow), under perf
        loop = run_in_child("compress.measure.latency:child_measure",
                            dict(path=os.path.abspath(path), threads=threads, delegate="xnnpack",
                                 warmup=10, runs=invokes, min_secs=0.0, input_size=None),
                            prefix=["perf", "record", "-q", "-o", data, "--"])
        if "error" in loop:
            raise RuntimeError(f"perf record failed: {loop['error'][-300:]}")
        p50 = loop["latency_p50_ms"]
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso,symbol"],
                             capture_output=True, text=True)
    return p50, {k: v * p50 for k, v in parse_report(rep.stdout).items()}


def format_table(paths: Sequence[str], results: Sequence[tuple[float, dict]]) -> str:
    names = [os.path.basename(p) for p in paths]
    width = max(38, *(len(n) for n in names))
    fams = [f for f, _ in FAMILIES] + ["other"]
    lines = [f"{'ms per invoke':38s}" + "".join(f"  {n:>{width}s}" for n in names),
             f"{'p50 of the loop':38s}" + "".join(f"  {r[0]:{width}.3f}" for r in results)]
    for f in fams:
        if any(r[1].get(f, 0) >= 0.0005 for r in results):
            lines.append(f"{f:38s}" + "".join(f"  {r[1].get(f, 0):{width}.3f}" for r in results))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more .tflite files")
    try:
        results = [profile(p, invokes=FLAGS.invokes, threads=FLAGS.threads) for p in paths]
    except (RuntimeError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    print(format_table(paths, results))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
