"""The training engine: schedule, weight-decay exclusions, checkpoints and resume (in process and
after a SIGKILL), TensorBoard tags, multi-scale batches, bfloat16, MirroredStrategy."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import SIZES, make_train_ds, make_val_ds, tiny_convnet, tiny_vit

from compress.distill import Distiller
from compress.training import WarmupCosine, get_strategy, make_optimizer, set_mixed_precision, train
from models.compat import keras, tf

WORKER = pathlib.Path(__file__).with_name("train_worker.py")
REPO = pathlib.Path(__file__).resolve().parents[2]


def run_worker(*args, timeout=400):
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_get_strategy():
    assert get_strategy("default").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="--strategy must be one of default, mirrored"):
        get_strategy("horovod")


def test_warmup_cosine_schedule():
    s = WarmupCosine(1e-3, total_steps=110, warmup_steps=10, min_lr=1e-5)
    np.testing.assert_allclose(float(s(0)), 1e-5, rtol=1e-6)  # warm-up starts at min_lr
    np.testing.assert_allclose(float(s(5)), 1e-5 + 0.5 * (1e-3 - 1e-5), rtol=1e-5)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), (1e-3 + 1e-5) / 2, rtol=1e-5)  # half-way cosine
    np.testing.assert_allclose(float(s(110)), 1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(s(500)), 1e-5, rtol=1e-5)
    assert all(float(s(i)) >= float(s(i + 1)) for i in range(10, 110, 7))


def test_weight_decay_skips_biases_norms_and_position_embedding():
    """Zero gradients: Adam's update is 0, so only the decoupled weight decay moves weights."""
    keras.backend.clear_session()
    model = tiny_vit()
    variables = model.trainable_variables
    opt = make_optimizer(variables, lr=0.1, weight_decay=0.5, steps=10)
    before = [v.numpy().copy() for v in variables]
    opt.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    for v, b in zip(variables, before):
        moved = not np.allclose(v.numpy(), b)
        should = v.shape.rank > 1 and "pos_embed" not in v.name
        assert moved == should, v.name


def _tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags, values = set(), {}
    for f in pathlib.Path(logdir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            tags.add(tag)
            values.setdefault(tag, []).extend(
                (e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag))
    return tags, values


def test_distill_multiscale_tensorboard_and_metrics(tmp_path):
    keras.backend.clear_session()
    d = Distiller(tiny_convnet(), tiny_vit(input_size=48), kind="soft", alpha=0.5,
                  temperature=2.0, label_smoothing=0.1)
    metrics = train(d, make_train_ds, steps=12, workdir=str(tmp_path), lr=5e-3,
                    weight_decay=0.01, warmup_steps=2, val_ds=make_val_ds(), eval_every=6,
                    checkpoint_every=4, log_every=3, verbose=True)
    assert metrics["step"] == 12 and metrics["start_step"] == 0
    assert 0.0 <= metrics["val_top1"] <= 1.0 and math.isfinite(metrics["val_loss"])
    assert math.isfinite(metrics["train_loss"]) and metrics["images_per_sec"] > 0
    tags, values = _tags(tmp_path / "tb")
    want = {"train/loss", "train/label_loss", "train/kd_loss", "train/accuracy",
            "train/learning_rate", "train/images_per_sec", "train/resolution",
            "train/batch_size", "val/top1", "val/loss"}
    assert want <= tags, want - tags
    # One resolution per step, following the sampler's plan (step k -> SIZES[k % 3]).
    res = sorted(values["train/resolution"])
    assert [s for s, _ in res] == list(range(1, 13))
    assert [v for _, v in res] == [SIZES[(s - 1) % len(SIZES)] for s, _ in res]
    assert sorted(s for s, _ in values["val/top1"]) == [6, 12]
    assert d.train_function.experimental_get_tracing_count() == 1  # one graph for all sizes
    lr = dict(values["train/learning_rate"])
    np.testing.assert_allclose(lr[3], float(WarmupCosine(5e-3, 12, 2)(2)), rtol=1e-5)
    ckpts = tf.train.get_checkpoint_state(str(tmp_path / "ckpt")).all_model_checkpoint_paths
    assert sorted(int(p.rsplit("-", 1)[1]) for p in ckpts) == [8, 12]  # max_to_keep=2


class _Crash(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen > self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_equals_uninterrupted_run(tmp_path):
    """A crash after step 10 and a resume from the step-10 checkpoint give the same weights as a
    run that was never stopped: model, optimizer slots, step, schedule and data all continue."""
    starts = []

    def factory(start):
        starts.append(start)
        return make_train_ds(start)

    kw = dict(steps=16, lr=5e-3, weight_decay=0.05, warmup_steps=4, checkpoint_every=5,
              eval_every=8, verbose=False)
    keras.backend.clear_session()
    tf.random.set_seed(0)
    ref = tiny_convnet()
    w0 = ref.get_weights()
    train(ref, make_train_ds, workdir=str(tmp_path / "a"), **kw)

    model = tiny_convnet()
    model.set_weights(w0)
    with pytest.raises(KeyboardInterrupt):
        train(model, factory, workdir=str(tmp_path / "b"), callbacks=[_Crash(12)], **kw)
    assert tf.train.latest_checkpoint(str(tmp_path / "b" / "ckpt")).endswith("ckpt-10")
    starts.clear()
    resumed = tiny_convnet()  # fresh random weights: all must come from the checkpoint
    metrics = train(resumed, factory, workdir=str(tmp_path / "b"), **kw)
    assert metrics["start_step"] == 10 and metrics["step"] == 16
    assert starts == [10]  # one pipeline, restarted at the checkpoint's step (10..16 in 1 fit)
    for a, b in zip(ref.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # A finished run called again trains nothing and reports its figures.
    again = train(tiny_convnet(), factory, workdir=str(tmp_path / "b"),
                  val_ds=make_val_ds(), **kw)
    assert again["start_step"] == 16 and again["step"] == 16 and "val_top1" in again


def test_kill_and_resume_subprocess(tmp_path):
    """SIGKILL a real training process once a checkpoint exists, then resume it."""
    out1, out2 = tmp_path / "first.json", tmp_path / "second.json"
    workdir = tmp_path / "run"
    steps, every = 60, 5
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, ("resume", workdir, steps, every, 0.2, out1))],
        cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while tf.train.latest_checkpoint(str(workdir / "ckpt")) is None:
            assert proc.poll() is None, "worker exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out1.exists()
    saved = int(tf.train.latest_checkpoint(str(workdir / "ckpt")).rsplit("-", 1)[1])
    assert 0 < saved < steps and saved % every == 0

    result = run_worker("resume", workdir, steps, every, 0, out2)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out2.read_text())
    assert metrics["start_step"] == saved and metrics["step"] == steps
    # the pipeline restarts exactly at the checkpoint, then at eval boundaries that do not align
    assert metrics["data_starts"][0] == saved
    assert tf.train.latest_checkpoint(str(workdir / "ckpt")).endswith(f"ckpt-{steps}")
    assert math.isfinite(metrics["val_top1"])


def test_same_seed_same_figures_and_resume_equals_unbroken(tmp_path):
    """With `set_seed` (weights, dropout) and op determinism, two runs of a student with
    dropout give identical figures, and a run stopped after a checkpoint and resumed in a
    freshly seeded model ends with the same figures and weights (the dropout generators' state
    is in the checkpoint)."""
    out = tmp_path / "seeded.json"
    result = run_worker("seeded", tmp_path, out)
    assert result.returncode == 0, result.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["same_seed_same_init"] and d["other_seed_other_init"]
    assert d["saved"].endswith("ckpt-4") and d["rng_saved"]
    a, b, resumed = d["figures"]["a"], d["figures"]["b"], d["figures"]["resumed"]
    assert resumed["start_step"] == 4 and resumed["step"] == 12
    for key in ("val_top1", "val_loss", "train_loss", "train_accuracy"):
        assert a[key] == b[key], key
        np.testing.assert_allclose(resumed[key], a[key], rtol=1e-5, err_msg=key)
    assert d["weights_rel_b"] == 0.0
    assert d["weights_rel_resumed"] <= 1e-5


def test_mirrored_strategy_two_cpus(tmp_path):
    out = tmp_path / "mirrored.json"
    result = run_worker("mirrored", out)
    assert result.returncode == 0, result.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["replicas"] == 2
    first = d["records"][0]
    for key in ("step_loss", "step_label_loss", "step_kd_loss"):  # global-batch means
        np.testing.assert_allclose(first[key], d["want_step0"][key], rtol=1e-4)
    assert first["images"] == d["want_step0"]["images"]
    assert {r["resolution"] for r in d["records"]} == set(SIZES)
    assert all(math.isfinite(r[k]) for r in d["records"] for k in ("loss", "kd_loss"))
    # one SGD step across replicas == one step on the whole batch
    assert d["sgd_step_max_diff"] < 1e-5 < d["sgd_step_max_change"]
    np.testing.assert_allclose(d["got_val"], d["want_val"], rtol=1e-5)
    assert d["metrics"]["step"] == 6 and math.isfinite(d["metrics"]["val_loss"])
    assert "split evenly over the 2 replicas" in d["odd_error"]


def test_mixed_bfloat16(tmp_path):
    keras.backend.clear_session()
    with pytest.raises(ValueError, match="set_mixed_precision"):
        train(tiny_convnet(), make_train_ds, steps=1, workdir=str(tmp_path / "x"), lr=1e-3,
              weight_decay=0.0, mixed_precision="mixed_bfloat16", verbose=False)
    try:
        set_mixed_precision("mixed_bfloat16")
        student, teacher = tiny_convnet(), tiny_vit(input_size=48)
        assert student.get_layer("tiny_conv1").compute_dtype == "bfloat16"
        d = Distiller(student, teacher, kind="soft", alpha=0.5, temperature=2.0)
        metrics = train(d, make_train_ds, steps=4, workdir=str(tmp_path / "y"), lr=1e-3,
                        weight_decay=0.01, val_ds=make_val_ds(), mixed_precision="mixed_bfloat16",
                        verbose=False)
    finally:
        set_mixed_precision(None)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    assert student.trainable_variables[0].dtype == tf.float32  # variables stay float32


def test_pruning_callback_reaches_sparsity_through_distiller(tmp_path):
    """The prune stage passes `UpdatePruningStep`; it must find the wrapped layers inside the
    Distiller's student, and the schedule must reach its target within the run."""
    import tensorflow_model_optimization as tfmot

    keras.backend.clear_session()
    sched = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6,
                                                 frequency=2)
    student = tfmot.sparsity.keras.prune_low_magnitude(tiny_convnet(), pruning_schedule=sched)
    d = Distiller(student, tiny_convnet(name="teacher"), kind="hard", alpha=0.5)
    train(d, make_train_ds, steps=8, workdir=str(tmp_path), lr=1e-3, weight_decay=0.0,
          callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], checkpoint_every=4, verbose=False)
    stripped = tfmot.sparsity.keras.strip_pruning(student)
    kernel = stripped.get_layer("tiny_conv2").kernel.numpy()
    np.testing.assert_allclose((kernel == 0).mean(), 0.5, atol=0.02)
