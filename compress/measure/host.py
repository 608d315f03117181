"""Facts about the measuring host: its CPU and packages (`machine_info`), and its measured GEMM
ceiling under XNNPACK (`gemm_ceiling`), from which a model's floor (`floor_ms`: no
implementation of its matrix products runs faster here) follows."""

from __future__ import annotations

import os
import platform
_PACKAGES = ("tensorflow", "ai-edge-litert", "tf-keras", "tensorflow-model-optimization", "numpy")


_ISA_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve"}


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
