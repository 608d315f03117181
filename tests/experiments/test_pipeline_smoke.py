"""The smoke preset end to end on a small real subset of Imagenette: every stage, every artifact
of the contract, the structured cut of the prune stage (as in quick) carried through QAT and
export, then a second run that skips every finished stage (the run: conftest.py). Magnitude
pruning through the pipeline: tests/experiments/test_stale.py (default tier) and
test_pipeline_structured.py (slow tier).

Kill anywhere, lose nothing: a real pipeline process is SIGKILLed in a training stage (QAT,
right after a checkpoint), in export and in benchmark (both after `--overwrite`, once the first
file or row is written), then resumed with the same command without `--overwrite`. Every figure
must equal the unbroken smoke run's: the QAT metrics, the exported files and the results.csv
rows (no row lost, none duplicated, the same top-1). The default tier kills the benchmark stage
alone; the slow tier kills all three in turn.

Every test that reads the shared smoke run lives in this file: the test workers share a file,
not a session, so the run is made once.
"""

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import models
from compress.measure.costs import static_costs
from compress.tflite.audit import audit_tflite
from experiments.configs import get_config
from tests.helpers import REPO, pipeline_command

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
    # QAT trains the cut (dense) model: no pruning wrapper to preserve
    assert json.loads((workdir / "qat" / "model.json").read_text())["wrappers"] == ["qat"]


HEADS = 4  # attention heads of every MobileViT transformer block


def test_structured_cut_rebuilds_from_model_json_and_later_stages_use_it(smoke_run):
    """The prune stage cut the distilled student to a smaller dense model that
    `prune/model.json` rebuilds without compress/structured.py; QAT and export worked from it
    (its files smaller than the dense ones, its int8 files on the dense file's fast path)."""
    workdir, _, _ = smoke_run
    keep = json.loads((workdir / "prune" / "config.json").read_text())["keep"]
    spec = json.loads((workdir / "prune" / "model.json").read_text())
    widths = spec["overrides"]["widths"]
    assert set(widths) == {"expand", "mlp", "heads"}
    assert all(1 <= h <= HEADS for h in widths["heads"])  # MobileViT: heads cut by count
    size = next(iter(json.loads((workdir / "export" / "manifest.json").read_text()).values()))[
        "input_size"]  # the export size, where the MACs are counted
    cut = models.create_model(spec["name"], num_classes=spec["num_classes"], input_size=size,
                              **spec["overrides"])
    cut.load_weights(str(workdir / "prune" / "weights.h5"))  # rebuilt from model.json alone
    dense = models.create_model(spec["name"], num_classes=spec["num_classes"], input_size=size)
    kept = static_costs(cut, size)["macs"] / static_costs(dense, size)["macs"]
    summary = json.loads((workdir / "prune" / "structured.json").read_text())
    assert abs(summary["kept_fraction"] - kept) < 1e-9 and keep - 0.1 < kept <= keep
    assert cut.count_params() < dense.count_params()

    export = workdir / "export"
    files = {p.name.split(".", 1)[1]: p for p in export.glob("*.tflite")}
    assert "prune.fp32_sparse.tflite" not in files  # a dense cut has no zeros to store sparse
    assert files["prune.fp32.tflite"].stat().st_size < files["distill.fp32.tflite"].stat().st_size
    assert files["prune.int8.tflite"].stat().st_size < files["distill.int8.tflite"].stat().st_size
    dense_audit = audit_tflite(str(files["distill.int8.tflite"]))
    for name in ("prune.int8", "qat.int8"):
        audit = audit_tflite(str(files[f"{name}.tflite"]))
        assert audit["partitions"] == 1 and audit["undelegated_ops"] == {}, name
        # no float op the dense int8 file lacks (QAT's file quantizes even the stride-2
        # channel-multiplier depthwise convs that post-training int8 keeps float)
        extra = {op: n for op, n in audit["float_heavy_by_op"].items()
                 if n > dense_audit["float_heavy_by_op"].get(op, 0)}
        assert extra == {}, (name, extra)
    assert (audit_tflite(str(files["prune.int8.tflite"]))["float_heavy_by_op"]
            == dense_audit["float_heavy_by_op"])


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
    assert by[("prune", "fp32")]["prune_method"] == "structured"
    assert 0 < float(by[("prune", "fp32")]["kept_fraction"]) < 1


def test_export_records_the_keras_models_the_files_are_compared_with(smoke_run):
    """export/keras_reference.json: the Keras model each stage's files were converted from, its
    static costs (the rows' params and MACs) and its class per validation image, which the
    benchmark compares each file with; checked here against the distilled model rebuilt from
    its stage folder."""
    from experiments.data import eval_dataset, load_source

    workdir, _, data = smoke_run
    record = json.loads((workdir / "export" / "keras_reference.json").read_text())
    assert set(record) == {"distill", "prune", "qat"}
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for stage, ref in record.items():
        for r in (r for r in rows if r["stage"] == stage):
            assert (int(r["params"]), int(r["macs"])) == (ref["params"], ref["macs"]), r["path"]
    spec = json.loads((workdir / "distill" / "model.json").read_text())
    size = record["distill"]["input_size"]
    model = models.create_model(spec["name"], num_classes=spec["num_classes"], input_size=size)
    model.load_weights(str(workdir / "distill" / "weights.h5"))
    assert static_costs(model, size)["macs"] == record["distill"]["macs"]
    per_class = get_config("smoke").data.val_per_class
    val = eval_dataset(load_source(str(data), "val", limit_per_class=per_class), size=size,
                       batch_size=16)
    preds = np.concatenate([np.argmax(model(x, training=False).numpy(), -1) for x, _ in val])
    saved = np.load(workdir / "export" / record["distill"]["predictions"])
    assert saved.shape == preds.shape == (record["distill"]["num_examples"],)
    assert (saved == preds).mean() >= 0.98  # the same model and images (batching aside)


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


# ---------------------------------------------------------------- kill anywhere, lose nothing

FIGURES = ("val_top1", "val_loss", "train_loss", "train_accuracy")


def _kill_when(workdir, data, ready, *extra, timeout=1800):
    """Start the pipeline, SIGKILL it as soon as `ready()` is true; returns its stdout."""
    proc = subprocess.Popen(pipeline_command(workdir, data, *extra), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"the run ended before the kill point: {extra}"
            assert time.time() < deadline, f"kill point not reached: {extra}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return out


def _rows(workdir):
    path = workdir / "results.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_rows_equal(work, unbroken):
    """The resumed results.csv has the unbroken run's rows: none lost, none duplicated, the
    same top-1 and agreement."""
    key = ("path", "threads", "delegate")
    got_rows = {tuple(r[k] for k in key): r for r in _rows(work)}
    want_rows = {tuple(r[k] for k in key): r for r in _rows(unbroken)}
    assert len(got_rows) == len(_rows(work))  # no duplicates
    assert got_rows.keys() == want_rows.keys()
    for k, r in want_rows.items():
        assert got_rows[k]["top1"] == r["top1"] and got_rows[k]["agreement"] == r["agreement"], k
    assert os.path.exists(work / "benchmark" / "DONE")


def test_benchmark_killed_after_overwrite_resumes_the_rest(smoke_run, run_pipeline, tmp_path):
    """Killed after `--overwrite` once the first row is written: the old DONE must be gone, so
    the plain resume measures the rest (the kill point: the copy's results.csv is removed
    first, so the first row is the new process's)."""
    unbroken, _, data = smoke_run
    work = tmp_path / "killed"
    shutil.copytree(unbroken, work)
    (work / "results.csv").unlink()
    _kill_when(work, data, lambda: len(_rows(work)) >= 1, "--stages=benchmark", "--overwrite")
    assert not (work / "benchmark" / "DONE").exists()
    assert 0 < len(_rows(work)) < len(_rows(unbroken))
    run_pipeline(work, data, "--stages=benchmark")
    _assert_rows_equal(work, unbroken)


@pytest.mark.slow
def test_kill_anywhere_then_resume_equals_an_unbroken_run(smoke_run, run_pipeline, tmp_path):
    unbroken, _, data = smoke_run
    work = tmp_path / "killed"
    shutil.copytree(unbroken, work)

    # Each kill point is a file the new process writes; the copy's own one goes first, so the
    # kill cannot fire before the new process has started (and cleared DONE).
    # 1. QAT (training): killed just after its first checkpoint, resumed from it.
    every = "--config.qat.checkpoint_every=1"  # checkpoints only: the figures do not depend on it
    shutil.rmtree(work / "qat" / "ckpt", ignore_errors=True)
    _kill_when(work, data, lambda: (work / "qat" / "ckpt" / "checkpoint").exists(),
               "--stages=qat", "--overwrite", every)
    assert not (work / "qat" / "DONE").exists()
    proc, _ = run_pipeline(work, data, "--stages=qat", every)
    assert "resumed from" in proc.stdout
    got = json.loads((work / "qat" / "metrics.json").read_text())
    want = json.loads((unbroken / "qat" / "metrics.json").read_text())
    assert 0 < got["start_step"] < got["step"] == want["step"]
    for key in FIGURES:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)

    # 2. export: killed once the first file of the new export is listed, resumed file by file.
    manifest = work / "export" / "manifest.json"
    manifest.unlink()
    _kill_when(work, data, lambda: manifest.exists(), "--stages=export", "--overwrite")
    assert not (work / "export" / "DONE").exists()
    assert 0 < len(json.loads(manifest.read_text())) < len(
        json.loads((unbroken / "export" / "manifest.json").read_text()))
    run_pipeline(work, data, "--stages=export")
    files = sorted(json.loads(manifest.read_text()))
    assert files == sorted(json.loads((unbroken / "export" / "manifest.json").read_text()))
    for rel in files:  # deterministic training and conversion: the same bytes
        assert (work / rel).read_bytes() == (unbroken / rel).read_bytes(), rel

    # 3. benchmark: killed after --overwrite once the first row is written;
    # the old DONE must be gone, so the plain resume measures the rest.
    (work / "results.csv").unlink(missing_ok=True)
    _kill_when(work, data, lambda: len(_rows(work)) >= 1, "--stages=benchmark", "--overwrite")
    assert not (work / "benchmark" / "DONE").exists()
    assert len(_rows(work)) < len(_rows(unbroken))
    run_pipeline(work, data, "--stages=benchmark")
    _assert_rows_equal(work, unbroken)
