"""The export stage: every finished student stage as `export/<model>.<stage>.<format>.tflite`,
audited as written (ops, partitions, parity), listed in export/manifest.json file by file."""

from __future__ import annotations

from experiments.stages.context import EXPORT_STAGES, Run
from experiments.workdir import StageDir, read_json, write_json
from models.compat import keras


def run(ctx: Run, stage: StageDir) -> None:
    from compress.tflite.audit import audit_tflite
    from compress.tflite.convert import export_tflite
    from experiments.data import representative_images

    e, size = ctx.cfg.export, ctx.export_size
    stage.begin({"size": size, **e.to_dict()})
    rep = representative_images(ctx.train_src, size, e.representative_images,
                                seed=ctx.cfg.seed, crop_pct=ctx.cfg.data.crop_pct)
    manifest_path = stage.path / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    for stage_name in EXPORT_STAGES:
        if not StageDir(ctx.workdir, stage_name).done:
            print(f"[export] {stage_name} not trained, skipped")
            continue
        model = ctx.inference_model(stage_name, size)
        formats = e.formats[stage_name]
        if ctx.prune_facts(stage_name)["prune_method"] == "structured":
            formats = [f for f in formats if not f.endswith("_sparse")]  # dense: no zeros
        for fmt in formats:
            rel = f"export/{ctx.student}.{stage_name}.{fmt}.tflite"
            if rel in manifest and (ctx.workdir / rel).exists():
                continue
            meta = export_tflite(model, str(ctx.workdir / rel), fmt=fmt, input_size=size,
                                 representative=rep, xnnpack_friendly=e.xnnpack_friendly,
                                 float_layers=e.float_layers)
            ctx.forget_results(rel)  # rows measured on an older file of that name
            manifest[rel] = {"stage": stage_name, "format": fmt, "input_size": size,
                             **meta, "audit": audit_tflite(str(ctx.workdir / rel))}
            write_json(manifest_path, manifest)
            print(f"[export] {rel}: {meta.get('size_bytes', 0):,} bytes")
        keras.backend.clear_session()
    stage.finish({"files": sorted(manifest)})
