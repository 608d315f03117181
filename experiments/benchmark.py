"""The benchmark stage's measurement of a workdir: every exported file audited, scored through
the interpreter on the validation images, compared with its Keras model and timed in fresh
processes, one results.csv row per (file, threads, delegate), written as each is measured."""

from __future__ import annotations

import glob
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from compress.measure.accuracy import agreement, evaluate_tflite
from compress.measure.host import machine_info
from compress.measure.latency import measure_latency
from compress.results import table as res
from compress.tflite.audit import audit_tflite
from compress.tflite.interpreter import probe_delegation_isolated


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
    files = sorted(files if files is not None else glob.glob(os.path.join(workdir, "export", "*.tflite")))
    machine = machine_info()
    done = set()
    if resume and os.path.exists(res.results_path(workdir)):
        done = {res.row_key(r, res.KEY) for r in res.read_results(workdir)}
    written = []
    for path in files:
        rel = os.path.relpath(path, workdir)
        todo = [
            (t, d) for d in delegates for t in threads
            if res.row_key({"path": rel, "threads": t, "delegate": d}, res.KEY) not in done
        ]  # fmt: skip
        if not todo:
            log(f"{rel}: already measured")
            continue
        info = dict(file_info(path)) if file_info else {}
        audit = {}
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
            # the rest of file_info: prune facts, the run's teacher and labels-only top-1,
            # provenance
            row.update({k: v for k, v in info.items() if k not in kw
                        and k not in ("note", "input_size")})
            res.write_results(workdir, [row], machine=machine)
            written.append(row)
            log(f"{rel} threads={t} {d}: p50 {lat['latency_p50_ms']:.3f} ms")
    return written


def int8_latency_ms(model, path: str, *, input_size: int, threads: int, deny_amx: bool = False,
                    repeats: int = 3, **export_kwargs) -> float:
    """p50 milliseconds of `model` exported to `path` as the pipeline's int8 file (the fast
    path; `export_kwargs` as the export stage passes them) and timed on this host's XNNPACK at
    `threads`: the median over `repeats` fresh processes. Calibrated on random images (the time
    does not depend on them). What a structured prune's latency budget is measured with."""
    from compress.tflite.convert import export_tflite

    rep = np.random.default_rng(0).uniform(size=(8, input_size, input_size, 3)).astype(np.float32)
    export_tflite(model, path, fmt="int8", input_size=input_size, representative=rep,
                  num_calibration=len(rep), **export_kwargs)
    lat = measure_latency(path, threads=threads, warmup=5, runs=30, min_secs=0.5,
                          repeats=repeats, deny_amx=deny_amx, fallback=False)
    if lat["error"]:
        raise RuntimeError(f"{path}: XNNPACK could not run the int8 file: {lat['error']}")
    return float(lat["latency_p50_ms"])
