"""`results.csv`: one row per measured configuration, merged by key, written atomically.

`results.csv` holds one row per (TFLite file, threads, delegate) with the public
columns users rely on, in order (`COLUMNS`), followed by `EXTRA_COLUMNS` (the measurement's
conditions: runtime version, warm-up/run counts, host CPU), `PROVENANCE_COLUMNS` (the stage
fingerprints, code and runtime versions and host of every figure) and any further keys rows
carry.
Writing merges by key, so a resumed benchmark replaces its rows instead of duplicating them, and
the file is replaced atomically (a crash never leaves half a CSV).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from typing import Any, Iterable, Sequence

from compress.io import atomic_write, file_sizes, write_json


# The contract's columns, in order.
COLUMNS = (
    "model",
    "stage",
    "format",
    "path",
    "input_size",
    "size_bytes",
    "gzip_bytes",
    "threads",
    "delegate",
    "runtime",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_mean_ms",
    "latency_std_ms",
    "top1",
    "agreement",
    "flex_ops",
    "partitions",
    "undelegated_ops",
    "float_heavy_ops",
    "params",
    "macs",
    "sparsity",
    "note",
)


# Conditions of the measurement, written after the contract's columns when rows have them.
EXTRA_COLUMNS = (
    "memory_traffic_bytes",  # static estimate: weights read once + activations written and read
    "latency_p99_ms",
    "latency_min_ms",
    "first_invoke_ms",
    "peak_rss_mb",
    "runtime_version",
    "warmup",
    "runs",
    "repeats",
    "measured_delegate",
    "amx",  # absent | available | denied (compress.measure.latency: XNNPACK's AMX int8 kernels)
    "cpu",
    "host_figures",
    "prune_method",  # none (no pruning upstream) | magnitude | structured (compress/structured.py)
    "kept_fraction",  # structured: fraction of the dense student's MACs; magnitude: of weights
    "teacher_top1",  # the run's teacher, Keras, whole val split (the pipeline's benchmark stage)
    "baseline_top1",  # the run's labels-only student, likewise
)


# Where each figure comes from (experiments/fingerprint.py), after every column above.
PROVENANCE_COLUMNS = (
    "stage_fingerprint",  # of the stage whose model the file holds (its metrics.json has it)
    "benchmark_fingerprint",  # of the benchmark stage that measured the row
    "code_version",  # git commit (+dirty) of the code, or the package version
    "tensorflow_version",
    "litert_version",
    "host",  # CPU model and cores of the measuring machine
)


KEY = ("path", "threads", "delegate")


_NUMERIC = {
    "input_size", "size_bytes", "gzip_bytes", "threads", "latency_p50_ms", "latency_p90_ms",
    "latency_mean_ms", "latency_std_ms", "top1", "agreement", "flex_ops", "partitions",
    "float_heavy_ops", "params", "macs", "sparsity", "latency_p99_ms", "latency_min_ms",
    "first_invoke_ms", "peak_rss_mb", "warmup", "runs", "repeats", "kept_fraction",
}  # fmt: skip


_FLOATS = {k for k in _NUMERIC if k.endswith(("_ms", "_mb"))} | {"top1", "agreement", "sparsity",
                                                                 "kept_fraction"}


def format_ops(ops: Any) -> str:
    """`{op: count}` as the contract's `OP:count;OP:count` (sorted); strings pass through."""
    if ops is None:
        return ""
    if isinstance(ops, str):
        return ops
    return ";".join(f"{k}:{int(v)}" for k, v in sorted(dict(ops).items()))


def parse_ops(text: str) -> dict[str, int]:
    """Inverse of `format_ops`."""
    out: dict[str, int] = {}
    for part in filter(None, (text or "").split(";")):
        op, _, count = part.rpartition(":")
        out[op] = int(count)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        return format_ops(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def results_path(workdir_or_csv: str) -> str:
    """`<workdir>/results.csv`, or the path itself when it names a .csv file."""
    p = os.fspath(workdir_or_csv)
    return p if p.endswith(".csv") else os.path.join(p, "results.csv")


def read_results(workdir_or_csv: str, *, numeric: bool = False) -> list[dict]:
    """Rows of a results.csv as dicts of strings (or numbers/None where `numeric`)."""
    with open(results_path(workdir_or_csv), newline="") as f:
        rows = list(csv.DictReader(f))
    return [to_numeric(r) for r in rows] if numeric else rows


def to_numeric(row: dict) -> dict:
    """Numbers for the numeric columns (None where empty); other columns unchanged."""
    out = dict(row)
    for k, v in row.items():
        if k in _NUMERIC:
            if v is None or (isinstance(v, str) and v.strip() == ""):
                out[k] = None
            elif isinstance(v, str):
                try:
                    f = float(v)
                    out[k] = int(f) if f.is_integer() and k not in _FLOATS else f
                except ValueError:
                    out[k] = None
    return out


def row_key(row: dict, key: Sequence[str] = KEY) -> tuple:
    """The identity of a row (by default (path, threads, delegate)), as written in the CSV."""
    return tuple(_cell(row.get(k)) for k in key)


def write_results(
    workdir_or_csv: str,
    rows: Iterable[dict],
    *,
    key: Sequence[str] = KEY,
    merge: bool = True,
    machine: dict | None = None,
) -> str:
    """Write rows to results.csv, replacing existing rows with the same `key`; returns the path.

    Columns: `COLUMNS` in order, then `EXTRA_COLUMNS`, then any other keys (first-seen order).
    Existing rows with another key are kept (in their order), new keys are appended. The file
    is written to a temporary file in the same folder and renamed over the old one.
    `machine` (`machine_info()` of the measuring host) is saved beside it as machine.json,
    which `write_report` shows.
    """
    path = results_path(workdir_or_csv)
    rows = [dict(r) for r in rows]
    for r in rows:
        missing = [k for k in key if r.get(k) in (None, "")]
        if missing:
            raise ValueError(f"results row lacks key column(s) {missing}: {r}")
    existing = read_results(path) if merge and os.path.exists(path) else []
    merged: dict[tuple, dict] = {}
    for r in existing + rows:
        merged[row_key(r, key)] = r  # later rows (the new ones) win, first position is kept
    present = {k for r in merged.values() for k in r}
    header = list(COLUMNS) + [k for k in EXTRA_COLUMNS + PROVENANCE_COLUMNS if k in present]
    for r in merged.values():
        for k in r:
            if k not in header:
                header.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    for r in merged.values():
        w.writerow({k: _cell(r.get(k)) for k in header})
    atomic_write(path, buf.getvalue())
    if machine is not None:
        write_json(os.path.join(os.path.dirname(os.path.abspath(path)), "machine.json"), machine)
    return path


_NAME = re.compile(r"^(?P<model>[^.]+)\.(?P<stage>[^.]+)\.(?P<format>[^.]+)\.tflite$")


def parse_tflite_name(path: str) -> dict:
    """`export/<model>.<stage>.<format>.tflite` -> {'model', 'stage', 'format'} (ValueError else)."""
    m = _NAME.match(os.path.basename(path))
    if not m:
        raise ValueError(f"{path!r} is not named <model>.<stage>.<format>.tflite")
    return m.groupdict()


def make_row(
    path: str,
    latency: dict,
    *,
    workdir: str | None = None,
    model: str | None = None,
    stage: str | None = None,
    format: str | None = None,
    input_size: int | None = None,
    audit: dict | None = None,
    evaluation: dict | None = None,
    agreement: float | None = None,
    params: int | None = None,
    macs: int | None = None,
    sparsity: float | None = None,
    machine: dict | None = None,
    note: str = "",
    memory_traffic_bytes: int | None = None,
) -> dict:
    """One results row from `measure_latency` (and optionally `audit_tflite`, `evaluate_tflite`).

    Model, stage and format default to those in the file name. The path is stored relative to
    `workdir`. Partitions and undelegated ops come from the measured interpreter (0 and all ops
    for `delegate=none`); flex_ops and float_heavy_ops from the audit when given.
    """
    names = {}
    try:
        names = parse_tflite_name(path)
    except ValueError:
        pass
    notes = [n for n in (latency.get("note"), (evaluation or {}).get("note"), note) if n]
    shapes = latency.get("input_shapes") or []
    if input_size is None and shapes and len(shapes[0]) == 4 and shapes[0][1] == shapes[0][2]:
        input_size = shapes[0][1]  # the measured (static or resized) input
    audit = audit or {}
    row = {
        "model": model or names.get("model"),
        "stage": stage or names.get("stage"),
        "format": format or names.get("format"),
        "path": os.path.relpath(path, workdir) if workdir else path,
        "input_size": input_size,
        **file_sizes(path),
        "threads": latency.get("threads"),
        "delegate": latency.get("delegate"),
        "runtime": latency.get("runtime"),
        "latency_p50_ms": latency.get("latency_p50_ms"),
        "latency_p90_ms": latency.get("latency_p90_ms"),
        "latency_mean_ms": latency.get("latency_mean_ms"),
        "latency_std_ms": latency.get("latency_std_ms"),
        "top1": (evaluation or {}).get("top1"),
        "agreement": agreement,
        "flex_ops": audit.get("flex_ops"),
        "partitions": latency.get("partitions"),
        "undelegated_ops": format_ops(latency.get("undelegated_ops")),
        "float_heavy_ops": audit.get("float_heavy_ops"),
        "params": params,
        "macs": macs,
        "sparsity": sparsity,
        "note": "; ".join(notes),
    }
    for k in ("flex_ops", "float_heavy_ops"):
        if isinstance(row[k], (dict, list, tuple)):
            v = row[k]
            row[k] = sum(v.values()) if isinstance(v, dict) else len(v)
    for k in EXTRA_COLUMNS:
        if k in latency:
            row[k] = latency[k]
    if memory_traffic_bytes is not None:
        row["memory_traffic_bytes"] = memory_traffic_bytes
    if machine:
        row["cpu"] = machine.get("cpu")
        row["host_figures"] = machine.get("host_figures")
    return row


def num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _file_key(row: dict) -> tuple:
    return (row.get("workdir", ""), row.get("path"))


def one_row_per_file(rows: Sequence[dict]) -> list[dict]:
    """Each file's `threads=1, delegate=xnnpack` row, else its lowest-threads xnnpack row, else
    its first row."""
    by_file: dict[tuple, list[dict]] = {}
    for r in rows:
        by_file.setdefault(_file_key(r), []).append(r)

    def rank(r):
        return (str(r.get("delegate")) != "xnnpack", num(r.get("threads")) or 1e9)

    return [min(group, key=rank) for group in by_file.values()]
