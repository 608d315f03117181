"""Kill anywhere, lose nothing: a real pipeline process is SIGKILLed in a training stage (QAT,
right after a checkpoint), in export and in benchmark (both after `--overwrite`, once the first
file or row is written), then resumed with the same command without `--overwrite`. Every figure
must equal the unbroken smoke run's (conftest.py): the QAT metrics, the exported files and the
results.csv rows (no row lost, none duplicated, the same top-1). The default tier kills the
benchmark stage alone; the slow tier kills all three in turn.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.helpers import REPO, pipeline_command

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
