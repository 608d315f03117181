"""The TensorBoard HParams view of results rows: one trial per row."""

from __future__ import annotations

import os
import re
from typing import Sequence

from compress.results.table import num, read_results, to_numeric


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
                                       if any(num(r.get(k)) is not None for r in rows)]

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
                v = num(r.get(m))
                if v is not None:
                    tf.summary.scalar(m, v, step=0)
    return logdir
