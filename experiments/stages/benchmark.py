"""The benchmark stage: every exported file scored on the validation split, compared with the
Keras model it was converted from (recorded by the export stage) and timed per (threads,
delegate); the rows go to results.csv as each is measured (its only writer)."""

from __future__ import annotations

import os

from experiments.stages.context import Run, StageRefused
from experiments.stages.export import REFERENCE, keras_reference
from experiments.workdir import StageDir, read_json


def run(ctx: Run, stage: StageDir) -> None:
    from experiments import fingerprint
    from experiments.benchmark import benchmark_files
    from experiments.data import eval_indices

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
    indices = eval_indices(ctx.val_src, b.val_limit or None)
    per_stage = {}  # stage -> the export stage's Keras reference: predictions, static costs

    def keras_facts(stage_name):
        if stage_name not in per_stage:
            ref = keras_reference(ctx.workdir, stage_name, indices)
            if ref is None:
                raise StageRefused(f"benchmark: export/{REFERENCE} has no Keras reference of the "
                                   f"{stage_name} stage (an export made by an older version); "
                                   "redo it: --stages=export,benchmark --overwrite")
            per_stage[stage_name] = ref
        return per_stage[stage_name]

    def rel(path):
        return os.path.relpath(path, ctx.workdir)

    gain = ctx.distillation_gain()  # the run's teacher and labels-only top-1, on every row

    def file_info(path):
        meta = manifest[rel(path)]
        costs = keras_facts(meta["stage"])
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
        reference_predictions=lambda path: keras_facts(manifest[rel(path)]["stage"])["predictions"])
    stage.finish({"files": len(manifest)})
