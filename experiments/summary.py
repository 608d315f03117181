"""The distillation gain of one run, from per-image predictions on the validation split.

Every training stage saves its student's (or teacher's) predicted class for each validation
image, in the split's order, as `<stage>/val_predictions.npy` (the labels-only baseline in
`distill/baseline/`). Pairing the baseline's and the distilled student's correctness on the
same images gives the gain with a paired interval (`compress.stats`); the report stage puts it
in the opening line of report.md, in the HParams view (one trial per student, `distill.kind` a
hyperparameter) and, through the benchmark stage, in results.csv (`teacher_top1`,
`baseline_top1`).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from compress.stats import gain_line, paired_difference
from experiments.workdir import StageDir

PREDICTIONS = "val_predictions.npy"


def save_predictions(folder, predictions) -> None:
    """`predictions` (int class per validation image) to `<folder>/val_predictions.npy`,
    atomically."""
    path = pathlib.Path(folder) / PREDICTIONS
    tmp = path.with_name(f".{PREDICTIONS}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(predictions, np.int32))
    os.replace(tmp, path)


def load_predictions(folder, num_examples: int) -> np.ndarray | None:
    """The saved predictions, or None when absent or made on another validation split."""
    path = pathlib.Path(folder) / PREDICTIONS
    if not path.exists():
        return None
    pred = np.load(path)
    return pred if pred.shape == (num_examples,) else None


def _top1(folder, labels):
    pred = load_predictions(folder, len(labels))
    if pred is not None:
        return float((pred == labels).mean()), pred
    metrics = StageDir(pathlib.Path(folder).parent, pathlib.Path(folder).name).metrics()
    return metrics.get("val_top1"), None


def distillation_gain(workdir, labels, *, kind: str) -> dict:
    """Teacher, labels-only and distilled top-1 of `workdir`, the paired gain where both
    students' predictions exist, and the report's opening `line` (which says what is missing
    otherwise)."""
    labels = np.asarray(labels)
    workdir = pathlib.Path(workdir)
    teacher, _ = _top1(workdir / "teacher", labels)
    distilled, d_pred = _top1(workdir / "distill", labels)
    baseline, b_pred = _top1(workdir / "distill" / "baseline", labels)
    out = {"kind": kind, "teacher_top1": teacher, "baseline_top1": baseline,
           "distilled_top1": distilled, "paired": None}
    if d_pred is not None and b_pred is not None:
        out["paired"] = paired_difference(b_pred == labels, d_pred == labels)
        out["line"] = gain_line(out["paired"], teacher_top1=teacher, kind=kind)
    elif kind == "none":
        out["line"] = "**Distillation:** none (`distill.kind=none`): a labels-only student."
    else:
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        out["line"] = (f"**Distillation ({kind}):** teacher {pct(teacher)}, distilled "
                       f"{pct(distilled)}; no labels-only baseline with per-image predictions "
                       "(`--config.distill.baseline=true` trains one), so no measured gain.")
    return out


def student_trials(gain: dict, *, model: str, input_size: int) -> list[dict]:
    """HParams rows, one per trained student (labels-only and distilled), with the run's
    teacher and baseline top-1 and the paired gain as metrics."""
    paired = gain["paired"] or {}
    common = {"model": model, "format": "keras", "input_size": input_size,
              "teacher_top1": gain["teacher_top1"], "baseline_top1": gain["baseline_top1"],
              "gain": paired.get("diff"), "gain_low": paired.get("low"),
              "gain_high": paired.get("high")}
    rows = []
    if gain["baseline_top1"] is not None and gain["kind"] != "none":
        rows.append({**common, "stage": "baseline", "distill.kind": "none",
                     "top1": gain["baseline_top1"]})
    if gain["distilled_top1"] is not None:
        rows.append({**common, "stage": "distill", "distill.kind": gain["kind"],
                     "top1": gain["distilled_top1"]})
    return rows

