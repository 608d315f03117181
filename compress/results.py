"""`results.csv`, `report.md` with plots, and the TensorBoard HParams view of measured TFLite files.

`results.csv` holds one row per (TFLite file, threads, delegate) with the columns of
../shared/CONTRACT.md in order (`COLUMNS`), followed by `EXTRA_COLUMNS` (the measurement's
conditions: runtime version, warm-up/run counts, host CPU) and any further keys rows carry.
Writing merges by key, so a resumed benchmark replaces its rows instead of duplicating them, and
the file is replaced atomically (a crash never leaves half a CSV).

The report and the HParams view show one point / trial per row; the plots keep one point per
file (its `threads=1`, `delegate=xnnpack` row, else its fastest-config row) labelled
`stage/format`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from typing import Any, Iterable, Sequence

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
    "amx",  # absent | available | denied (compress.benchmark: XNNPACK's AMX int8 kernels)
    "cpu",
    "host_figures",
)
KEY = ("path", "threads", "delegate")
PLOTS = ("top1_vs_latency.png", "latency_vs_macs.png", "size_vs_top1.png")
_NUMERIC = {
    "input_size", "size_bytes", "gzip_bytes", "threads", "latency_p50_ms", "latency_p90_ms",
    "latency_mean_ms", "latency_std_ms", "top1", "agreement", "flex_ops", "partitions",
    "float_heavy_ops", "params", "macs", "sparsity", "latency_p99_ms", "latency_min_ms",
    "first_invoke_ms", "peak_rss_mb", "warmup", "runs", "repeats",
}  # fmt: skip
_FLOATS = {k for k in _NUMERIC if k.endswith(("_ms", "_mb"))} | {"top1", "agreement", "sparsity"}


# --------------------------------------------------------------------------- CSV


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



def _key(row: dict, key: Sequence[str]) -> tuple:
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
        merged[_key(r, key)] = r  # later rows (the new ones) win, first position is kept
    present = {k for r in merged.values() for k in r}
    header = list(COLUMNS) + [k for k in EXTRA_COLUMNS if k in present]
    for r in merged.values():
        for k in r:
            if k not in header:
                header.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    for r in merged.values():
        w.writerow({k: _cell(r.get(k)) for k in header})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if machine is not None:
        mpath = os.path.join(folder, "machine.json")
        with open(mpath + ".tmp", "w") as f:
            json.dump(machine, f, indent=2)
        os.replace(mpath + ".tmp", mpath)
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
    from compress.benchmark import file_sizes

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


# --------------------------------------------------------------------------- report


def _num(v: Any) -> float | None:
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
        return (str(r.get("delegate")) != "xnnpack", _num(r.get("threads")) or 1e9)

    return [min(group, key=rank) for group in by_file.values()]


def glance_lines(rows: Sequence[dict]) -> list[str]:
    """A markdown table of one row per file (its threads=1 / xnnpack row) with top-1 and p50
    relative to the same model's distilled fp32 file, scored on the same validation images:
    what each compression step costs and buys."""
    points = [to_numeric(r) for r in one_row_per_file(rows)]
    if not points:
        return []
    ref = {}
    for r in points:
        if r.get("stage") == "distill" and r.get("format") == "fp32":
            ref[(r.get("workdir"), r.get("model"))] = r
    head = ["model", "stage", "format", "top-1", "Δ top-1 (pts)", "p50 ms", "speed-up",
            "size KiB", "sparsity", "partitions", "float heavy ops"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {"distill": 0, "prune": 1, "qat": 2}
    for r in sorted(points, key=lambda r: (str(r.get("workdir")), str(r.get("model")),
                                           order.get(r.get("stage"), 9), str(r.get("format")))):
        base = ref.get((r.get("workdir"), r.get("model")))
        top1, p50 = _num(r.get("top1")), _num(r.get("latency_p50_ms"))
        d_top1 = speed = ""
        if base is not None and top1 is not None and _num(base.get("top1")) is not None:
            d_top1 = f"{100 * (top1 - _num(base['top1'])):+.1f}"
        if base is not None and p50 and _num(base.get("latency_p50_ms")):
            speed = f"{_num(base['latency_p50_ms']) / p50:.2f}x"
        size = _num(r.get("size_bytes"))
        sparsity = _num(r.get("sparsity"))
        out.append("| " + " | ".join([
            str(r.get("model", "")), str(r.get("stage", "")), str(r.get("format", "")),
            f"{100 * top1:.1f}%" if top1 is not None else "", d_top1,
            f"{p50:.2f}" if p50 else "", speed, f"{size / 1024:.0f}" if size else "",
            f"{sparsity:.3f}" if sparsity is not None else "",
            _md_value(r.get("partitions"), "partitions"),
            _md_value(r.get("float_heavy_ops"), "float_heavy_ops"),
        ]) + " |")  # fmt: skip
    return out


def _label(row: dict, with_workdir: bool) -> str:
    label = f"{row.get('stage')}/{row.get('format')}"
    if with_workdir and row.get("workdir"):
        label = f"{os.path.basename(os.path.normpath(str(row['workdir'])))}:{label}"
    return label


def _plot(rows, x, y, xlabel, ylabel, title, out, with_workdir, logx=False) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(_num(r.get(x)), _num(r.get(y)), _label(r, with_workdir)) for r in rows]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    if pts:
        models = sorted({str(r.get("model")) for r in rows})
        for m in models:
            sel = [
                (_num(r.get(x)), _num(r.get(y)))
                for r in rows
                if str(r.get("model")) == m and _num(r.get(x)) is not None and _num(r.get(y)) is not None
            ]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=m, s=30)
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no rows with both {x} and {y}", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    if logx and pts and all(p[0] > 0 for p in pts):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _label_points(fig, ax, pts)
    fig.savefig(out)
    plt.close(fig)
    return bool(pts)


def _label_points(fig, ax, pts, near_px: float = 6.0, step_pt: float = 9.0) -> None:
    """Labels scattered points without overlaps: points closer than `near_px` on screen share one
    label, and a label that would overlap one already placed (or leave the plot on the right) goes
    to the left of its point or moves down a line until it is free."""
    renderer = fig.canvas.get_renderer()
    groups: list[list] = []  # [x, y, screen_x, screen_y, labels]
    for px, py, label in pts:
        sx, sy = ax.transData.transform((px, py))
        for g in groups:
            if abs(g[2] - sx) < near_px and abs(g[3] - sy) < near_px:
                g[4].append(label)
                break
        else:
            groups.append([px, py, sx, sy, [label]])
    placed = []
    right_edge = ax.get_window_extent(renderer).x1
    for px, py, _, _, labels in sorted(groups, key=lambda g: (-g[3], g[2])):
        text = ", ".join(dict.fromkeys(labels))
        for i in range(40):
            for dx, ha in ((4, "left"), (-4, "right")):  # left of the point near the right edge
                ann = ax.annotate(text, (px, py), textcoords="offset points", ha=ha,
                                  xytext=(dx, 4 - i * step_pt), fontsize=7)  # fmt: skip
                box = ann.get_window_extent(renderer)
                if box.x1 <= right_edge and not any(box.overlaps(b) for b in placed):
                    break
                ann.remove()
            else:
                continue
            break
        else:  # no free spot: keep the first one
            ann = ax.annotate(text, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
            box = ann.get_window_extent(renderer)
        placed.append(box)


def _md_value(v: Any, col: str) -> str:
    f = _num(v)
    if f is None:
        return "" if v in (None, "") else str(v).replace("|", "\\|")
    if col in ("top1", "agreement", "sparsity"):
        return f"{f:.4f}"
    if col.endswith("_ms"):
        return f"{f:.3f}"
    if col in ("size_bytes", "gzip_bytes"):
        return f"{f / 1024:.1f} KiB"
    if col in ("params", "macs"):
        return f"{f / 1e6:.2f} M"
    if col == "memory_traffic_bytes":
        return f"{f / 2**20:.1f} MiB"
    return str(int(f)) if f.is_integer() else f"{f:g}"


_TABLE = (
    "model", "stage", "format", "input_size", "threads", "delegate", "latency_p50_ms",
    "latency_p90_ms", "top1", "agreement", "size_bytes", "gzip_bytes", "macs",
    "memory_traffic_bytes", "partitions", "undelegated_ops", "flex_ops", "float_heavy_ops",
    "sparsity", "note",
)  # fmt: skip


def _machine_lines(machine: dict | None) -> list[str]:
    if not machine:
        return ["(no machine.json beside results.csv: the host of the measurements is unknown)"]
    lines = [f"- CPU: {machine.get('cpu')} ({machine.get('machine')}), {machine.get('cores')} cores"]
    pk = machine.get("packages") or {}
    lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v))
    if machine.get("host_figures"):
        lines.append(f"- **{machine.get('label', 'host figures: not phone figures')}**")
    return lines


def write_report(
    workdir: str,
    *,
    rows: Sequence[dict] | None = None,
    out_dir: str | None = None,
    machine: dict | Sequence[dict] | None = None,
    title: str | None = None,
) -> str:
    """Write `report.md` and the three PNG plots (`PLOTS`) into `out_dir` (default `workdir`).

    Args:
      workdir: the workdir whose results.csv (and machine.json) to read when `rows` is None.
      rows: result rows (dicts); rows with a `workdir` key are labelled with it.
      out_dir: where report.md and the plots go.
      machine: `machine_info()` of the measuring host(s); default: `<workdir>/machine.json`.
      title: the report's heading.

    Returns:
      The path of report.md.
    """
    out_dir = out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    if rows is None:
        rows = read_results(workdir)
    rows = list(rows)
    if machine is None:
        mpath = os.path.join(workdir, "machine.json")
        if os.path.exists(mpath):
            with open(mpath) as f:
                machine = json.load(f)
    machines = [machine] if isinstance(machine, dict) or machine is None else list(machine)
    with_workdir = any(r.get("workdir") for r in rows)
    points = one_row_per_file(rows)
    p1 = _plot(points, "latency_p50_ms", "top1", "latency p50 (ms)", "top-1",
               "top-1 vs latency", os.path.join(out_dir, PLOTS[0]), with_workdir)
    p2 = _plot(points, "macs", "latency_p50_ms", "MACs", "latency p50 (ms)",
               "latency vs MACs", os.path.join(out_dir, PLOTS[1]), with_workdir, logx=True)
    p3 = _plot(points, "size_bytes", "top1", "file size (bytes)", "top-1",
               "size vs top-1", os.path.join(out_dir, PLOTS[2]), with_workdir, logx=True)  # fmt: skip
    cols = (("workdir",) if with_workdir else ()) + _TABLE
    lines = [f"# {title or 'TFLite benchmark report'}", "", "## Machine", ""]
    for m in machines:
        lines += _machine_lines(m)
    lines += [
        "",
        "Latency: median (p50) and p90 of timed `invoke()` calls after warm-up, each "
        "configuration in a fresh process. Plots show one point per file (its threads=1 / "
        "xnnpack row where there is one).",
        "",
    ]
    glance = glance_lines(rows)
    if glance:
        lines += ["## At a glance", "",
                  "One row per file (1 thread, XNNPACK). Δ top-1 and speed-up are against the "
                  "same model's distilled fp32 file, on the same validation images.", "",
                  *glance, ""]  # fmt: skip
    lines += [
        "## Results",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_md_value(r.get(c), c) for c in cols) + " |")
    lines += ["", "## Plots", ""]
    for name, ok in zip(PLOTS, (p1, p2, p3)):
        stem = name[:-4].replace("_", " ")
        lines.append(f"![{stem}]({name})" + ("" if ok else "  (no data for this plot)"))
        lines.append("")
    path = os.path.join(out_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path


# --------------------------------------------------------------------------- HParams

HPARAM_KEYS = ("model", "stage", "format", "input_size", "threads", "delegate")
METRIC_KEYS = ("latency_p50_ms", "top1", "size_bytes", "agreement")
# Written when rows carry them: the distillation kind of each student and the run's training
# figures (experiments.summary: one trial per Keras student beside the TFLite files' trials).
OPTIONAL_HPARAM_KEYS = ("distill.kind",)
OPTIONAL_METRIC_KEYS = ("teacher_top1", "baseline_top1", "gain", "gain_low", "gain_high")


def _trial_name(row: dict, index: int) -> str:
    threads = row.get("threads")
    parts = [row.get("workdir"), row.get("model"), row.get("stage"), row.get("format"),
             None if threads in (None, "") else f"t{threads}", row.get("delegate")]  # fmt: skip
    parts = [os.path.basename(os.path.normpath(str(p))) for p in parts if p not in (None, "")]
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", ".".join(parts)) or "trial"
    return f"{index:03d}.{name}"


def write_hparams(workdir_or_logdir: str, rows: Sequence[dict] | None = None) -> str:
    """TensorBoard HParams: one trial per row (= per TFLite file, threads and delegate).

    Hparams: model, stage, format, input_size, threads, delegate (and workdir, distill.kind
    when rows have them); metrics: latency_p50_ms, top1, size_bytes, agreement (and
    `OPTIONAL_METRIC_KEYS` when rows have them; empty metrics are not written).
    A path that ends in `tb/hparams` is used as is; otherwise it is a workdir and the logs go
    to `<workdir>/tb/hparams`. Returns that log folder.
    """
    from tensorboard.plugins.hparams import api as hp

    from models.compat import tf

    norm = os.path.normpath(os.fspath(workdir_or_logdir))
    if norm.endswith(os.path.join("tb", "hparams")):
        logdir = norm
    else:
        logdir = os.path.join(norm, "tb", "hparams")
        if rows is None:
            rows = read_results(norm)
    if rows is None:
        raise ValueError("rows are required when a log folder (not a workdir) is given")
    rows = [to_numeric(r) for r in rows]
    keys = list(HPARAM_KEYS) + (["workdir"] if any(r.get("workdir") for r in rows) else [])
    keys += [k for k in OPTIONAL_HPARAM_KEYS if any(r.get(k) not in (None, "") for r in rows)]
    metric_keys = list(METRIC_KEYS) + [k for k in OPTIONAL_METRIC_KEYS
                                       if any(_num(r.get(k)) is not None for r in rows)]

    def hvalue(r, k):
        v = r.get(k)
        if k in ("input_size", "threads"):
            return float(v) if v is not None else -1.0
        return "" if v is None else str(v)

    hparams = {}
    for k in keys:
        values = sorted({hvalue(r, k) for r in rows})
        hparams[k] = hp.HParam(k, hp.Discrete(values) if values else None)
    metrics = [hp.Metric(m, display_name=m) for m in metric_keys]
    os.makedirs(logdir, exist_ok=True)
    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams_config(hparams=list(hparams.values()), metrics=metrics)
    for i, r in enumerate(rows):
        trial = os.path.join(logdir, _trial_name(r, i))
        with tf.summary.create_file_writer(trial).as_default():
            hp.hparams({hparams[k]: hvalue(r, k) for k in keys}, trial_id=_trial_name(r, i))
            for m in metric_keys:
                v = _num(r.get(m))
                if v is not None:
                    tf.summary.scalar(m, v, step=0)
    return logdir
