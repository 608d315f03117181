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

from compress.distill import Distiller
from compress.training import (WarmupCosine, auto_mixed_precision, get_strategy, make_optimizer,
                               set_mixed_precision, train)
from models.compat import keras, tf
from tests.compress.train_helpers import (SIZES, local_cluster, make_train_ds, make_val_ds,
                                         tiny_convnet, tiny_vit)

# run as `python -m tests.compress.train_worker` from the repository root
WORKER = ["-m", "tests.compress.train_worker"]
REPO = pathlib.Path(__file__).resolve().parents[2]


def run_worker(*args, timeout=400):
    return subprocess.run([sys.executable, *WORKER, *map(str, args)], cwd=REPO,
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
        [sys.executable, *WORKER, *map(str, ("resume", workdir, steps, every, 0.2, out1))],
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


# --------------------------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two real worker processes on loopback ports


def _start_workers(tmp_path, tag, workdir, init_h5, steps, every, sleep_s):
    """Start the two tasks of a 2-worker cluster (TF_CONFIG on loopback ports); each gets its own
    TMPDIR so that the test can see where the non-chief writes."""
    procs = []
    for task, tf_config in enumerate(local_cluster(2)):
        tmp = tmp_path / f"tmp{task}"
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ, TMPDIR=str(tmp), TF_CONFIG=tf_config)
        log = open(tmp_path / f"{tag}{task}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, *WORKER, "multi_worker", str(workdir), str(init_h5), str(steps),
             str(every), str(sleep_s), str(tmp_path / f"{tag}")],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs, tmp_path, tag, timeout=300):
    for task, p in enumerate(procs):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        log = (tmp_path / f"{tag}{task}.log").read_text()
        assert p.returncode == 0, f"worker {task} failed:\n{log[-3000:]}"
    return [json.loads((tmp_path / f"{tag}{t}.json").read_text()) for t in range(2)]


def _single_process_reference(tmp_path, steps, every):
    """The initial weights (saved for the workers) and the weights after `steps` steps of the same
    global batches in this process, on one device."""
    from tests.compress.train_worker import multi_worker_model

    keras.backend.clear_session()
    tf.random.set_seed(1)
    model = multi_worker_model()
    init = tmp_path / "init.h5"
    model.save_weights(str(init))
    metrics = train(model, make_train_ds, steps=steps, workdir=str(tmp_path / "single"), lr=5e-3,
                    weight_decay=0.05, warmup_steps=2, checkpoint_every=every,
                    eval_every=every * 2, verbose=False)
    return init, model.get_weights(), metrics


# Summation order differs (each worker reduces half a batch, then an all-reduce adds the halves),
# so float32 weights agree to rounding: measured 1e-7 after 3 steps (weights ~0.3, each step
# moves them ~2e-3). One variable is left out: the attention key bias, whose gradient is zero in
# exact arithmetic (softmax is invariant to it) and is rounding noise that AdamW's normalisation
# turns into lr-sized steps of random sign.
MW_ATOL = 1e-5
MW_NOISE_ONLY = ("attn_k/bias",)


def _assert_weights_equal(got_npz, want):
    from tests.compress.train_worker import multi_worker_model

    names = [v.name for v in multi_worker_model().weights]
    got = np.load(got_npz)
    got = [got[f"arr_{i}"] for i in range(len(got.files))]
    assert len(got) == len(want) == len(names)
    compared = 0
    for name, a, b in zip(names, got, want):
        if not any(key in name for key in MW_NOISE_ONLY):
            np.testing.assert_allclose(a, b, rtol=0, atol=MW_ATOL, err_msg=name)
            compared += 1
    assert compared == len(names) - 1


def test_multi_worker_two_processes(tmp_path):
    """Two worker processes train 6 steps together: both finish, only the chief (worker 0)
    writes checkpoints and TensorBoard events, and the weights equal a one-process run of the
    same global batches."""
    steps, every = 6, 3
    init, want, ref = _single_process_reference(tmp_path, steps, every)
    workdir = tmp_path / "mw"
    out = _wait_all(_start_workers(tmp_path, "mw", workdir, init, steps, every, 0),
                    tmp_path, "mw")
    assert [m["step"] for m in out] == [steps, steps] and out[0]["replicas"] == 2
    for m in out:  # the last chunk's means over the global batches, as in one process
        np.testing.assert_allclose([m["train_loss"], m["train_accuracy"]],
                                   [ref["train_loss"], ref["train_accuracy"]], rtol=1e-4)
    for task in range(2):
        _assert_weights_equal(tmp_path / f"mw{task}.npz", want)
    # Checkpoints: the chief's, in ckpt/ and nothing else; the non-chief's scratch is gone.
    ckpts = tf.train.get_checkpoint_state(str(workdir / "ckpt")).all_model_checkpoint_paths
    assert sorted(int(p.rsplit("-", 1)[1]) for p in ckpts) == [3, 6]
    assert not [p for p in (workdir / "ckpt").iterdir() if p.is_dir()]
    assert not list((tmp_path / "tmp1").glob("ckpt-nonchief-*"))
    # TensorBoard: event files carry the writer's pid; only the chief's exist.
    events = list((workdir / "tb").rglob("events.out.tfevents.*"))
    assert events and {int(e.name.split(".")[-3]) for e in events} == {out[0]["pid"]}


@pytest.mark.slow
def test_multi_worker_kill_one_and_resume(tmp_path):
    """kill -9 of the non-chief once a checkpoint exists; the chief then waits in a collective or
    fails, and is killed if still running; both restarted resume from the chief's last checkpoint and end with the
    weights of an uninterrupted one-process run."""
    steps, every = 30, 5
    init, want, ref = _single_process_reference(tmp_path, steps, every)
    workdir = tmp_path / "mw"
    procs = _start_workers(tmp_path, "first", workdir, init, steps, every, 0.3)
    try:
        deadline = time.time() + 300
        while tf.train.latest_checkpoint(str(workdir / "ckpt")) is None:
            assert all(p.poll() is None for p in procs), "a worker exited before a checkpoint"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
        time.sleep(2)
        # the chief cannot finish without its peer: it waits in a collective, or its collective
        # is aborted ("Socket closed", UNAVAILABLE) and it exits with an error
        assert procs[0].poll() != 0
        # the non-chief had saved into its own scratch folder, not into ckpt/
        assert list((tmp_path / "tmp1").glob("ckpt-nonchief-*/ckpt-*.index"))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    saved = int(tf.train.latest_checkpoint(str(workdir / "ckpt")).rsplit("-", 1)[1])
    assert 0 < saved < steps and saved % every == 0

    out = _wait_all(_start_workers(tmp_path, "second", workdir, init, steps, every, 0),
                    tmp_path, "second")
    assert [m["start_step"] for m in out] == [saved, saved]
    assert [m["step"] for m in out] == [steps, steps]
    for task in range(2):
        _assert_weights_equal(tmp_path / f"second{task}.npz", want)


def test_one_step_trace_for_all_resolutions_of_the_real_sampler(tmp_path, imagenette_dir,
                                                                 monkeypatch):
    """Accelerator readiness: the real multi-scale stream (None spatial dims in element_spec)
    gives one trace of the train step for every resolution and every fit chunk, not one per
    size or per batch (a retrace costs seconds on a CPU, tens of seconds under XLA)."""
    from experiments import data as ip

    monkeypatch.setenv("VIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = ip.load_source(str(imagenette_dir), "train", limit_per_class=2)
    sampler = ip.MultiScaleSampler(min_size=32, max_size=64, n_scales=3, base_size=48,
                                   base_batch=4, check_scale=16)
    seen = set()

    class Sizes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.add(int(logs["resolution"]))

    keras.backend.clear_session()
    d = Distiller(tiny_convnet(num_classes=src.num_classes),
                  tiny_vit(num_classes=src.num_classes, input_size=32), kind="soft")
    steps = 30
    train(d, lambda step: ip.train_dataset(src, sampler, start_step=step, augment=None),
          steps=steps, workdir=str(tmp_path / "run"), lr=1e-3, weight_decay=0.0, eval_every=10,
          callbacks=[Sizes()], verbose=False)
    assert seen == set(sampler.sizes) and len(seen) == 3
    assert d.train_function.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("devices,flags,want", [
    ([{"device_type": "TPU"}], set(), "mixed_bfloat16"),
    ([{"device_type": "GPU", "compute_capability": (9, 0)}], set(), "mixed_float16"),
    ([{"device_type": "GPU", "compute_capability": (7, 0)}], set(), "mixed_float16"),
    ([{"device_type": "GPU", "compute_capability": (6, 1)}], {"avx512_bf16"}, "float32"),
    ([], {"avx512f", "avx512_bf16"}, "mixed_bfloat16"),
    ([], {"amx_bf16", "amx_tile"}, "mixed_bfloat16"),
    ([], {"avx2", "avx512f"}, "float32"),
])
def test_auto_mixed_precision_per_device_type(devices, flags, want):
    assert auto_mixed_precision(devices, flags) == want


def test_set_mixed_precision_auto_and_refusal():
    try:
        assert set_mixed_precision("auto") == auto_mixed_precision()  # this machine's pick
        assert keras.mixed_precision.global_policy().name == auto_mixed_precision()
        with pytest.raises(ValueError, match="mixed_precision must be one of float32"):
            set_mixed_precision("bfloat16")
    finally:
        set_mixed_precision(None)


def test_mixed_float16_trains_with_loss_scaling(tmp_path):
    """mixed_float16 (the GPU pick): Keras wraps the optimizer in a LossScaleOptimizer, and the
    Distiller's step goes through it (scaled loss, unscaled gradients), so weights move."""
    keras.backend.clear_session()
    try:
        set_mixed_precision("mixed_float16")
        student = tiny_convnet()
        w0 = [w.copy() for w in student.get_weights()]
        d = Distiller(student, None)
        metrics = train(d, make_train_ds, steps=3, workdir=str(tmp_path), lr=1e-2,
                        weight_decay=0.0, mixed_precision="mixed_float16", verbose=False)
    finally:
        set_mixed_precision(None)
    assert isinstance(d.optimizer, keras.mixed_precision.LossScaleOptimizer)
    assert math.isfinite(metrics["train_loss"])
    kernel = student.get_layer("tiny_head").kernel
    assert kernel.dtype == tf.float32
    assert not np.allclose(kernel.numpy(), w0[-2])
