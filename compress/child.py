"""Run one function in a fresh Python process and get its JSON result back: the project's one
way to isolate work that can crash the process (an XNNPACK abort in `allocate_tensors`) or must
not share it (latency: no TensorFlow, thread pools or allocator state of the parent).

    result = run_in_child("compress.measure.latency:child_measure", dict(path=..., ...))

The child runs `python -I` (isolated: no user site, no PYTHON* variables, the script's folder not
on sys.path) with only the repository root added to sys.path, imports the named module, calls
the function with the keyword arguments and writes its return value (a JSON-serialisable dict)
atomically to a temporary file that the parent reads. Whatever goes wrong comes back as
`{"error": "..."}`: an exception in the function (its type and message), a timeout, or the
death of the process (its signal or exit code and the last lines of its stderr).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BOOT = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
from compress.io import atomic_write
module, _, function = sys.argv[2].partition(":")
try:
    result = getattr(importlib.import_module(module), function)(**json.loads(sys.argv[3]))
except Exception as e:  # the parent decides what a failure means
    result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
atomic_write(sys.argv[4], json.dumps(result))
"""


def run_in_child(target: str, kwargs: dict, *, timeout: float = 900.0,
                 env: dict | None = None, prefix: list[str] | None = None) -> dict:
    """`module:function(**kwargs)` in a fresh process; its dict, or {"error": why}.

    `prefix` runs the child under another program (e.g. `["perf", "record", "--"]`).
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
           **(env or {})}
    with tempfile.TemporaryDirectory(prefix="child_") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [*(prefix or []), sys.executable, "-I", "-c", _BOOT, ROOT, target,
               json.dumps(kwargs), out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    code = proc.returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    tail = [ln for ln in (proc.stderr or "").strip().splitlines() if "Created TensorFlow" not in ln]
    return {"error": f"process died ({how}): {' | '.join(tail[-3:])}".rstrip(": ")}
