"""The export stage: every finished student stage as `export/<model>.<stage>.<format>.tflite`,
audited as written (ops, partitions, parity), listed in export/manifest.json file by file.

Beside the files, the Keras model each stage's files were converted from is recorded once
(`export/keras_reference.json`): its static costs at the export size and its predicted class
for every validation image (`export/<stage>.keras_predictions.npy`). The benchmark stage
compares every file with it without building a Keras model again."""

from __future__ import annotations

import numpy as np

from experiments.stages.context import EXPORT_STAGES, Run
from experiments.workdir import StageDir, read_json, write_json
from models.compat import keras

REFERENCE = "keras_reference.json"


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
        record_keras_reference(ctx, stage, stage_name, model, size)
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


def record_keras_reference(ctx: Run, stage: StageDir, stage_name: str, model, size: int) -> None:
    """`model`'s static costs at `size` and its top-1 class per validation image (the whole split,
    in its order), into `export/keras_reference.json` and `export/<stage>.keras_predictions.npy`;
    kept when already there (a resumed export: the stage it was made from is unchanged, or the
    run would have refused to resume)."""
    from compress.io import atomic_path
    from compress.measure.costs import static_costs

    path = stage.path / REFERENCE
    record = read_json(path) if path.exists() else {}
    name = f"{stage_name}.keras_predictions.npy"
    if stage_name in record and (stage.path / name).exists():
        return
    preds = np.concatenate([np.argmax(logits.numpy(), -1) for logits, _ in ctx.val_logits(
        model, size, f"[export] {stage_name}: Keras reference")]).astype(np.int32)
    with atomic_path(stage.path / name) as tmp:
        np.save(tmp, preds)
    costs = static_costs(model, size)
    record[stage_name] = {"predictions": name, "num_examples": int(preds.shape[0]),
                          "input_size": size, "params": costs["params"], "macs": costs["macs"],
                          "memory_traffic_bytes": costs["memory_traffic_bytes"]}
    write_json(path, record)


def keras_reference(workdir, stage_name: str, indices: np.ndarray | None = None) -> dict | None:
    """A stage's Keras reference recorded by `record_keras_reference`, its `predictions` loaded
    (restricted to the validation examples `indices`, e.g. `experiments.data.eval_indices`), or
    None where the export stage did not record it."""
    folder = StageDir(workdir, "export", writes=False).path
    path = folder / REFERENCE
    record = (read_json(path) if path.exists() else {}).get(stage_name)
    if record is None or not (folder / record["predictions"]).exists():
        return None
    preds = np.load(folder / record["predictions"])
    return {**record, "predictions": preds if indices is None else preds[indices]}
