"""The benchmark stage: every exported file scored on the validation split and timed per
(threads, delegate); the rows go to results.csv as each is measured (its only writer)."""

from __future__ import annotations

import os

import numpy as np

from experiments.stages.context import Run
from experiments.workdir import StageDir, read_json
from models.compat import keras


def run(ctx: Run, stage: StageDir) -> None:
    from compress.measure.costs import static_costs
    from experiments import fingerprint
    from experiments.benchmark import benchmark_files

    b = ctx.cfg.benchmark
    stage.begin(b.to_dict())
    manifest = read_json(ctx.require("export").path / "manifest.json")
    if ctx.overwrite:  # measure every file again; without --overwrite, finished rows stay
        for rel in manifest:
            ctx.forget_results(rel)
    fp = stage.provenance.get("fingerprint")
    ctx.keep_results(lambda r: r.get("benchmark_fingerprint") == fp and r["path"] in manifest)
    size = ctx.export_size
    val = ctx.val_ds(size, limit=b.val_limit or None)  # a class-balanced subset
    val = [(x.numpy(), y.numpy()) for x, y in val]  # scored once per file, same images
    per_stage = {}  # stage -> (Keras top-1 per image, static costs), computed once

    def stage_facts(stage_name):
        if stage_name not in per_stage:
            model = ctx.inference_model(stage_name, size)
            preds = np.concatenate([np.argmax(model(x, training=False).numpy(), -1)
                                    for x, _ in val])
            per_stage[stage_name] = (preds, static_costs(model, size))
            keras.backend.clear_session()
        return per_stage[stage_name]

    def rel(path):
        return os.path.relpath(path, ctx.workdir)

    gain = ctx.distillation_gain()  # the run's teacher and labels-only top-1, on every row

    def file_info(path):
        meta = manifest[rel(path)]
        costs = stage_facts(meta["stage"])[1]
        return {"model": ctx.student, "stage": meta["stage"], "format": meta["format"],
                "input_size": size, "params": costs["params"], "macs": costs["macs"],
                "memory_traffic_bytes": costs["memory_traffic_bytes"],
                "sparsity": meta["audit"].get("sparsity"), **ctx.prune_facts(meta["stage"]),
                "teacher_top1": gain["teacher_top1"], "baseline_top1": gain["baseline_top1"],
                **fingerprint.row_columns(ctx.workdir, meta["stage"], fp)}

    threads = [t or os.cpu_count() for t in b.threads]
    benchmark_files(
        str(ctx.workdir), [str(ctx.workdir / r) for r in sorted(manifest)],
        threads=threads, delegates=list(b.delegates), warmup=b.warmup, runs=b.runs,
        input_size=size, dataset=val, file_info=file_info, deny_amx=b.deny_amx,
        reference_predictions=lambda path: stage_facts(manifest[rel(path)]["stage"])[0])
    stage.finish({"files": len(manifest)})
