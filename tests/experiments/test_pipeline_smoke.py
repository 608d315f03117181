"""The smoke preset end to end on a small real subset of Imagenette: every stage, every artifact
of the contract, then a second run that skips every finished stage (the run: conftest.py)."""

import csv
import glob
import json
import os

REQUIRED = {("distill", "fp32"), ("distill", "fp16"), ("distill", "drq"), ("distill", "int8"),
            ("prune", "fp32"), ("prune", "int8"), ("qat", "int8")}
TRAINING = ("teacher", "distill", "prune", "qat")


def test_training_stages_leave_the_contract_files(smoke_run):
    workdir, _, _ = smoke_run
    for stage in TRAINING:
        for name in ("config.json", "model.json", "weights.h5", "metrics.json", "DONE"):
            assert (workdir / stage / name).exists(), f"{stage}/{name}"
        metrics = json.loads((workdir / stage / "metrics.json").read_text())
        assert 0.0 <= metrics["val_top1"] <= 1.0
    assert json.loads((workdir / "qat" / "model.json").read_text())["wrappers"] == ["prune", "qat"]
    assert 0.45 <= json.loads((workdir / "prune" / "metrics.json").read_text())["sparsity"] <= 0.55


def test_teacher_cache_is_built_once_and_reused(smoke_run):
    """The smoke preset distils from the teacher cache: built in the distill stage, reused by
    prune and QAT; every student (the labels-only baseline too) saved its val predictions."""
    workdir, _, _ = smoke_run
    manifest = json.loads((workdir / "distill" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["views"] == 2
    for stage in ("distill", "prune", "qat"):
        cache = json.loads((workdir / stage / "metrics.json").read_text())["teacher_cache"]
        assert cache["views"] == 2 and cache["bytes_per_image_view"] == 4 * 10 + 9
    assert json.loads((workdir / "distill" / "metrics.json").read_text())[
        "teacher_cache"]["build_s_this_stage"] > 0
    assert json.loads((workdir / "prune" / "metrics.json").read_text())[
        "teacher_cache"]["build_s_this_stage"] < 5  # confirmed, not rebuilt
    for folder in ("teacher", "distill", "distill/baseline", "prune", "qat"):
        assert (workdir / folder / "val_predictions.npy").exists(), folder


def test_results_csv_has_every_required_row_measured(smoke_run):
    workdir, _, _ = smoke_run
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[:4] == ["model", "stage", "format", "path"]
    assert {"teacher_top1", "baseline_top1"} <= set(header)
    assert all(0 <= float(r["teacher_top1"]) <= 1 and 0 <= float(r["baseline_top1"]) <= 1
               for r in rows)
    one_thread = {(r["stage"], r["format"]) for r in rows
                  if r["threads"] == "1" and r["delegate"] == "xnnpack"}
    assert REQUIRED <= one_thread
    for r in rows:
        assert (workdir / r["path"]).exists()
        assert r["flex_ops"] == "0"
        assert float(r["latency_p50_ms"]) > 0 and float(r["latency_p90_ms"]) >= float(
            r["latency_p50_ms"])
        assert 0.0 <= float(r["top1"]) <= 1.0 and 0.0 <= float(r["agreement"]) <= 1.0
        assert int(r["params"]) > 0 and int(r["macs"]) > 0
        assert int(r["memory_traffic_bytes"]) > int(r["params"])  # weights alone are 4 B each
    by = {(r["stage"], r["format"]): r for r in rows if r["threads"] == "1"}
    # the fast int8 path: QAT and PTQ int8 graphs stay inside one XNNPACK partition, no float
    # convolutions / fully-connected / matmuls
    for key in (("distill", "int8"), ("qat", "int8")):
        assert by[key]["float_heavy_ops"] == "0", by[key]
        assert by[key]["partitions"] == "1", by[key]
    assert float(by[("prune", "fp32")]["sparsity"]) >= 0.45


def test_report_plots_and_tensorboard(smoke_run):
    workdir, _, _ = smoke_run
    report = (workdir / "report.md").read_text()
    for stage, fmt in REQUIRED:
        assert f"| mobilevit_xxs | {stage} | {fmt} |" in report
    # the opening line: teacher, labels-only and distilled top-1 and the paired gain
    assert report.split("\n")[2].startswith("**Distillation (soft):** teacher "), report[:500]
    assert "labels-only" in report.split("\n")[2] and "95% CI" in report.split("\n")[2]
    assert "| labels-only baseline |" in report
    assert "| distill |" in report.split("## Training stages")[1]
    for png in ("top1_vs_latency.png", "latency_vs_macs.png", "size_vs_top1.png"):
        assert (workdir / png).stat().st_size > 1000
    from tensorboard.backend.event_processing import event_accumulator

    tags = set()
    for events in glob.glob(str(workdir / "tb" / "distill" / "**" / "events.*"), recursive=True):
        acc = event_accumulator.EventAccumulator(events, size_guidance={"tensors": 0})
        acc.Reload()
        tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    for tag in ("train/kd_loss", "train/resolution", "train/images_per_sec"):
        assert tag in tags, sorted(tags)
    hparams = glob.glob(str(workdir / "tb" / "hparams" / "**" / "events.*"), recursive=True)
    assert hparams, "no HParams event files"


def test_second_run_skips_finished_stages(smoke_run, run_pipeline):
    workdir, _, data = smoke_run
    before = {s: os.path.getmtime(workdir / s / "DONE") for s in TRAINING}
    proc, seconds = run_pipeline(workdir, data)
    for stage in TRAINING + ("export", "benchmark"):
        assert f"[{stage}] done already, skipped" in proc.stdout
    assert before == {s: os.path.getmtime(workdir / s / "DONE") for s in TRAINING}
