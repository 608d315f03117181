"""`report.md` and its plots from results rows.

The report and the HParams view show one point / trial per row; the plots keep one point per
file (its `threads=1`, `delegate=xnnpack` row, else its fastest-config row) labelled
`stage/format`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from compress.io import atomic_write
from compress.results.table import num, one_row_per_file, read_results, to_numeric

PLOTS = ("top1_vs_latency.png", "latency_vs_macs.png", "size_vs_top1.png")
FRONT = "front.png"  # written when there are structured-prune rows (`front_plot`)


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
            "MMACs", "size KiB", "sparsity", "partitions", "float heavy ops"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {"distill": 0, "prune": 1, "qat": 2}
    for r in sorted(points, key=lambda r: (str(r.get("workdir")), str(r.get("model")),
                                           order.get(r.get("stage"), 9), str(r.get("format")))):
        base = ref.get((r.get("workdir"), r.get("model")))
        top1, p50 = num(r.get("top1")), num(r.get("latency_p50_ms"))
        d_top1 = speed = ""
        if base is not None and top1 is not None and num(base.get("top1")) is not None:
            d_top1 = f"{100 * (top1 - num(base['top1'])):+.1f}"
        if base is not None and p50 and num(base.get("latency_p50_ms")):
            speed = f"{num(base['latency_p50_ms']) / p50:.2f}x"
            if host_of(r) != host_of(base):  # latencies of two machines: no speed-up
                speed = f"none: measured on {host_of(r)}, its reference on {host_of(base)}"
        size, macs = num(r.get("size_bytes")), num(r.get("macs"))
        sparsity = num(r.get("sparsity"))
        timed = f"{p50:.2f}" if p50 else ""
        if timed and r.get("delegate") == "xnnpack" and r.get("measured_delegate") == "none":
            # e.g. magnitude pruning's int8_sparse file: not a deployment candidate
            timed += " (XNNPACK refused the file: timed without it)"
            speed = ""
        out.append("| " + " | ".join([
            str(r.get("model", "")), _stage_name(r), str(r.get("format", "")),
            f"{100 * top1:.1f}%" if top1 is not None else "", d_top1,
            timed, speed, f"{macs / 1e6:.0f}" if macs else "",
            f"{size / 1024:.0f}" if size else "",
            f"{sparsity:.3f}" if sparsity is not None else "",
            _md_value(r.get("partitions"), "partitions"),
            _md_value(r.get("float_heavy_ops"), "float_heavy_ops"),
        ]) + " |")  # fmt: skip
    return out


def host_of(row: dict) -> str:
    """The machine a row was measured on (`host`, else the older `cpu` column)."""
    return str(row.get("host") or row.get("cpu") or "unknown host").replace("|", "/")


def _stage_name(row: dict) -> str:
    """The stage, with the kept fraction of a structured prune (`prune(keep 0.70)`): the points
    of a latency/accuracy front across keep levels tell themselves apart."""
    stage, kept = str(row.get("stage")), num(row.get("kept_fraction"))
    if row.get("prune_method") == "structured" and kept is not None:
        return f"{stage}(keep {kept:.2f})"
    return stage


def _label(row: dict, with_workdir: bool) -> str:
    macs = num(row.get("macs"))
    label = f"{_stage_name(row)}/{row.get('format')}" + (f" {macs / 1e6:.0f}M MACs" if macs else "")
    if with_workdir and row.get("workdir"):
        label = f"{os.path.basename(os.path.normpath(str(row['workdir'])))}:{label}"
    return label


def _plot(rows, x, y, xlabel, ylabel, title, out, with_workdir, logx=False) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(num(r.get(x)), num(r.get(y)), _label(r, with_workdir)) for r in rows]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    if pts:
        models = sorted({str(r.get("model")) for r in rows})
        for m in models:
            sel = [
                (num(r.get(x)), num(r.get(y)))
                for r in rows
                if str(r.get("model")) == m and num(r.get(x)) is not None and num(r.get(y)) is not None
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
    f = num(v)
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


def _front_points(points: Sequence[dict]) -> dict:
    """{(model, format): [(macs, p50, top1, label)]} of the models with structured-prune files:
    their dense distilled files and their cuts, fp32 and int8, sorted by MACs (largest first)."""
    points = [to_numeric(r) for r in points]
    cut = {r.get("model") for r in points if r.get("prune_method") == "structured"}
    out: dict = {}
    for r in points:
        structured = r.get("stage") == "prune" and r.get("prune_method") == "structured"
        if (r.get("model") not in cut or r.get("format") not in ("fp32", "int8")
                or not (structured or r.get("stage") == "distill")):
            continue
        macs, p50, top1 = num(r.get("macs")), num(r.get("latency_p50_ms")), num(r.get("top1"))
        if None in (macs, p50, top1):
            continue
        kept = num(r.get("kept_fraction"))
        label = (f"keep {kept:.2f}" if structured and kept is not None else "dense") + \
            f" {macs / 1e6:.0f}M"
        out.setdefault((str(r["model"]), str(r["format"])), []).append((macs, p50, top1, label))
    return {k: sorted(v, key=lambda p: -p[0]) for k, v in out.items()}


def front_plot(points: Sequence[dict], out: str) -> bool:
    """The latency/accuracy front of structured pruning (`FRONT`): one panel per model, top-1
    against p50 of its dense distilled files and its cuts, a line per format (fp32, int8)
    through them in MAC order (points of equal MACs from several workdirs averaged for the line,
    each drawn), every point labelled with its kept fraction and MACs. False (and no file) when
    no row is a structured cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = _front_points(points)
    models = sorted({m for m, _ in series})
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.4), dpi=100,
                             squeeze=False)
    labels = []  # (axes, its points' labels), placed once the layout is final
    for ax, model in zip(axes[0], models):
        labelled = []
        for fmt, marker in (("fp32", "o"), ("int8", "s")):
            pts = series.get((model, fmt), [])
            if not pts:
                continue
            macs = sorted({p[0] for p in pts}, reverse=True)
            line = [(np.mean([p[1] for p in pts if p[0] == m]),
                     np.mean([100 * p[2] for p in pts if p[0] == m])) for m in macs]
            ax.plot(*zip(*line), marker=marker, linestyle="-", alpha=0.5, label=fmt)
            ax.scatter([p[1] for p in pts], [100 * p[2] for p in pts], marker=marker, s=22,
                       color=ax.lines[-1].get_color())
            labelled += [(p[1], 100 * p[2], f"{fmt} {p[3]}") for p in pts]
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("latency p50 (ms, 1 thread, XNNPACK)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.margins(x=0.25, y=0.15)
        labels.append((ax, labelled))
    fig.tight_layout()
    for ax, labelled in labels:
        _label_points(fig, ax, labelled)
    fig.savefig(out)
    plt.close(fig)
    return True


def write_report(
    workdir: str,
    *,
    rows: Sequence[dict] | None = None,
    out_dir: str | None = None,
    machine: dict | Sequence[dict] | None = None,
    title: str | None = None,
    preamble: Sequence[str] = (),
    appendix: Sequence[str] = (),
) -> str:
    """Write `report.md` and the three PNG plots (`PLOTS`) into `out_dir` (default `workdir`).

    Args:
      workdir: the workdir whose results.csv (and machine.json) to read when `rows` is None.
      rows: result rows (dicts); rows with a `workdir` key are labelled with it.
      out_dir: where report.md and the plots go.
      machine: `machine_info()` of the measuring host(s); default: `<workdir>/machine.json`.
      title: the report's heading.
      preamble: lines right under the heading (the pipeline's distillation gain, teacher and
        provenance).
      appendix: lines at the end (the pipeline's training stages).

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
    front = front_plot(points, os.path.join(out_dir, FRONT))
    if not front and os.path.exists(os.path.join(out_dir, FRONT)):  # an earlier run's
        os.remove(os.path.join(out_dir, FRONT))
    cols = (("workdir",) if with_workdir else ()) + _TABLE
    lines = [f"# {title or 'TFLite benchmark report'}", ""]
    if preamble:
        lines += [*preamble, ""]
    lines += ["## Machine", ""]
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
    if front:
        lines += ["The structured-pruning front: each model's dense distilled files and its cuts "
                  "(kept fraction of the MACs, MACs), fp32 and int8, on the same validation "
                  "images.", "", f"![structured front]({FRONT})", ""]
    for name, ok in zip(PLOTS, (p1, p2, p3)):
        stem = name[:-4].replace("_", " ")
        lines.append(f"![{stem}]({name})" + ("" if ok else "  (no data for this plot)"))
        lines.append("")
    if appendix:
        lines += [*appendix, ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write(path, "\n".join(lines))
    return path
