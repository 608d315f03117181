"""The distill stage of the smoke preset under `--strategy=multi_worker` (slow tier): two pipeline
processes on this machine (TF_CONFIG on loopback ports) after a one-process teacher stage, in
one workdir (its lock must not refuse the second worker). A kill -9 of one worker, then a
restart of both, resumes from the chief's last checkpoint; both finish; the chief alone writes
the stage's files and TensorBoard events.

The default tier checks multi-worker training at the library level
(tests/compress/test_training.py: two processes, weights equal to a one-process run with a
BatchNorm-free model, since MobileViT's BatchNorm statistics are per replica) and the workdir
locks of the tasks (tests/experiments/test_bad_inputs.py)."""

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from models.compat import tf
from tests.helpers import REPO, local_cluster, pipeline_command, run_pipeline

STEPS, EVERY = 12, 4


def start_workers(tmp_path, tag, workdir, data, steps=STEPS, *extra):
    distill = ["--stages=distill", "--strategy=multi_worker",
               f"--config.distill.steps={steps}", f"--config.distill.checkpoint_every={EVERY}",
               *extra]
    procs = []
    for task, tf_config in enumerate(local_cluster(2)):
        log = open(tmp_path / f"{tag}{task}.log", "w")
        procs.append(subprocess.Popen(pipeline_command(workdir, data, *distill), cwd=REPO,
                                      env=dict(os.environ, TF_CONFIG=tf_config),
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def events_pids(logdir):
    """pids of the processes that wrote TensorBoard event files (the file names carry them)."""
    return {int(p.name.split(".")[-3]) for p in pathlib.Path(logdir).rglob("events.out.*")}


@pytest.mark.slow
def test_distill_stage_on_two_workers(tmp_path, imagenette_dir):
    workdir = tmp_path / "run"
    run_pipeline(workdir, imagenette_dir, "--stages=teacher", timeout=900)
    ckpt = workdir / "distill" / "ckpt"

    procs = start_workers(tmp_path, "first", workdir, imagenette_dir)
    try:
        deadline = time.time() + 600
        # a checkpoint counts once the state file names it (the kill may land mid-save)
        while tf.train.latest_checkpoint(str(ckpt)) is None:
            assert all(p.poll() is None for p in procs), (tmp_path / "first1.log").read_text()
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGKILL)  # the non-chief
        procs[1].wait()
        time.sleep(2)
        assert procs[0].poll() != 0  # the chief waits in a collective or fails, never finishes
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert not (workdir / "distill" / "DONE").exists()
    saved = int(tf.train.latest_checkpoint(str(ckpt)).rsplit("-", 1)[1])
    assert 0 < saved < STEPS

    procs = start_workers(tmp_path, "second", workdir, imagenette_dir)
    for task, p in enumerate(procs):
        p.wait(timeout=900)
        assert p.returncode == 0, (tmp_path / f"second{task}.log").read_text()[-3000:]
    chief_log = (tmp_path / "second0.log").read_text()
    assert "[distill] starting" in chief_log and f"at step {saved}/{STEPS}" in chief_log
    assert (workdir / "distill" / "DONE").exists() and (workdir / "distill" / "weights.h5").exists()
    metrics = json.loads((workdir / "distill" / "metrics.json").read_text())
    assert metrics["step"] == STEPS and metrics["start_step"] == saved
    assert 0.0 <= metrics["train_accuracy"] <= 1.0 and 0.0 <= metrics["val_top1"] <= 1.0
    ckpts = sorted(int(p.name.split("-")[1].split(".")[0]) for p in ckpt.glob("ckpt-*.index"))
    assert ckpts[-1] == STEPS
    # the chief's pid alone in the distill events of the second run (the first run's chief too)
    assert procs[0].pid in events_pids(workdir / "tb" / "distill")
    assert procs[1].pid not in events_pids(workdir / "tb" / "distill")


def test_non_chief_stage_dir_reads_and_writes_nothing(tmp_path):
    """A non-chief worker's StageDir sees the chief's DONE and writes, resets nothing (its
    save_weights still runs, into a scratch file: it may be an all-reduce)."""
    from experiments.workdir import StageDir
    from models.compat import keras

    chief = StageDir(tmp_path, "distill")
    chief.begin({"a": 1})
    other = StageDir(tmp_path, "distill", writes=False)
    assert not other.done
    chief.finish({"val_top1": 0.5})
    assert other.done and other.metrics()["val_top1"] == 0.5
    before = sorted(p.name for p in tmp_path.rglob("*"))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    base = other.child("baseline")
    for stage in (other, base):
        stage.begin({"a": 2})
        stage.save_model_json(name="x", num_classes=2)
        stage.save_weights(model)
        stage.write_json("sparsity.json", {})
        stage.finish({"val_top1": 0.9})
        stage.reset()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert other.metrics()["val_top1"] == 0.5 and not base.writes
