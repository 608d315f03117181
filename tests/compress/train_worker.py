"""Subprocess worker for tests/compress/test_training.py (not a test module).

  python -m tests.compress.train_worker resume WORKDIR STEPS CKPT_EVERY SLEEP_S OUT_JSON
  python -m tests.compress.train_worker mirrored OUT_JSON
  python -m tests.compress.train_worker seeded WORKDIR OUT_JSON

  TF_CONFIG=... python -m tests.compress.train_worker multi_worker WORKDIR INIT_H5 STEPS \
      CKPT_EVERY SLEEP_S OUT_PREFIX

`mirrored` must configure two logical CPU devices before TensorFlow initialises, which is why
it runs in its own process; `seeded` turns on op determinism, which lasts for the process.
`multi_worker` is one task of a `MultiWorkerMirroredStrategy`
cluster described by TF_CONFIG; it trains `multi_worker_model()` from the weights in INIT_H5 on
`make_train_ds` and writes OUT_PREFIX<task>.json (metrics, pid) and OUT_PREFIX<task>.npz (the
final weights).
"""

import json
import os
import sys
import time

from models.compat import keras, tf


def resume(workdir, steps, ckpt_every, sleep_s, out):
    from tests.compress.train_helpers import make_train_ds, make_val_ds, tiny_convnet

    from compress.training import train

    starts = []

    def factory(start_step):
        starts.append(int(start_step))
        return make_train_ds(start_step)

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(sleep_s)

    metrics = train(tiny_convnet(), factory, steps=steps, workdir=workdir, lr=1e-2,
                    weight_decay=0.01, warmup_steps=3, val_ds=make_val_ds(),
                    checkpoint_every=ckpt_every, eval_every=ckpt_every * 3,
                    callbacks=[Slow()] if sleep_s else [], verbose=False)
    metrics["data_starts"] = starts
    with open(out, "w") as f:
        json.dump(metrics, f)


def mirrored(out):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from tests.compress.train_helpers import make_train_ds, make_val_ds, tiny_convnet, tiny_vit

    from compress.distill import Distiller, distillation_loss
    from compress.training import train

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        # No BN/dropout in the student: its training-mode logits do not depend on how the batch
        # is split, so step 0 under the strategy must equal a one-device computation.
        student = tiny_vit(name="student")
        teacher = tiny_vit(input_size=48, name="teacher")
        distiller = Distiller(student, teacher, kind="soft", alpha=0.5, temperature=2.0,
                              label_smoothing=0.1)
    x0, y0 = next(iter(make_train_ds(0)))
    t0 = teacher(tf.image.resize(x0, (48, 48)), training=False)
    total, lab, kd = distillation_loss(y0, student(x0, training=True), None, t0, kind="soft",
                                       alpha=0.5, temperature=2.0, label_smoothing=0.1)
    want_step0 = dict(step_loss=float(np.mean(total)), step_label_loss=float(np.mean(lab)),
                      step_kd_loss=float(np.mean(kd)), images=int(x0.shape[0]))
    val = make_val_ds()
    want_val = float(np.mean(np.concatenate([
        distillation_loss(y, student(x, training=False), kind="none", label_smoothing=0.1)[1]
        for x, y in val])))

    # One SGD step under the strategy (gradients summed over replicas by the optimizer) must
    # equal one step on the mean loss of the whole batch on one device.
    w0 = student.get_weights()
    with strategy.scope():
        s2 = tiny_vit(name="s2")
        s2.set_weights(w0)
        d2 = Distiller(s2, teacher, kind="soft", alpha=0.5, temperature=2.0, label_smoothing=0.1)
        d2.compile(optimizer=keras.optimizers.SGD(0.5))
    d2.train_on_batch(x0, y0)
    ref = tiny_vit(name="ref")
    ref.set_weights(w0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(distillation_loss(y0, ref(x0, training=True), None, t0, kind="soft",
                                                alpha=0.5, temperature=2.0,
                                                label_smoothing=0.1)[0])
    grads = tape.gradient(loss, ref.trainable_variables)
    want_w = [(v - 0.5 * g).numpy() for v, g in zip(ref.trainable_variables, grads)]
    sgd_step_max_diff = max(float(np.abs(a - b.numpy()).max())
                            for a, b in zip(want_w, s2.trainable_variables))
    sgd_step_max_change = max(float(np.abs(a - b).max())
                              for a, b in zip(want_w, [v.numpy() for v in ref.trainable_variables]))

    records = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            records.append({k: float(v) for k, v in logs.items()})

    # val before training: evaluate() under the strategy must equal the single-device value
    with strategy.scope():
        distiller.compile(optimizer=keras.optimizers.SGD(0.0))
    got_val = distiller.evaluate(val, verbose=0, return_dict=True)["loss"]
    import tempfile

    metrics = train(distiller, make_train_ds, steps=6, workdir=tempfile.mkdtemp(), lr=1e-3,
                    weight_decay=0.01, val_ds=val, strategy=strategy, callbacks=[Record()],
                    checkpoint_every=3, verbose=False)
    # An odd global batch must be refused.
    odd = tf.data.Dataset.from_tensors((x0[:3], y0[:3])).repeat()
    try:
        with strategy.scope():
            s2 = tiny_convnet(name="odd")
        train(s2, odd, steps=2, workdir=tempfile.mkdtemp(), lr=1e-3, weight_decay=0.0,
              strategy=strategy, verbose=False)
        odd_error = ""
    except Exception as e:  # noqa: BLE001
        odd_error = f"{type(e).__name__}: {e}"
    with open(out, "w") as f:
        json.dump(dict(metrics=metrics, records=records, want_val=want_val, got_val=got_val,
                       want_step0=want_step0, sgd_step_max_diff=sgd_step_max_diff,
                       sgd_step_max_change=sgd_step_max_change,
                       replicas=strategy.num_replicas_in_sync, odd_error=odd_error[:2000]), f)


def seeded(workdir, out):
    """Same seed, same figures: two runs of a student with dropout, and a run crashed after a
    checkpoint then resumed (a fresh model, seeded again, as a restarted process would be)."""
    import numpy as np
    import tests.compress.train_helpers as helpers
    from tests.compress.train_helpers import make_val_ds, tiny_convnet

    from compress.training import set_seed, train

    kw = dict(steps=12, lr=1e-2, weight_decay=0.01, warmup_steps=2, checkpoint_every=4,
              eval_every=6, verbose=False)

    def make_train_ds(start):  # one size: one trace per fit, a cheaper test
        return helpers.make_train_ds(start, multiscale=False)

    def student(seed=0):
        set_seed(seed)
        return tiny_convnet(dropout=0.5)

    class Crash(keras.callbacks.Callback):
        def __init__(self, at):
            super().__init__()
            self.at, self.seen = at, 0

        def on_train_batch_begin(self, batch, logs=None):
            self.seen += 1
            if self.seen > self.at:
                raise KeyboardInterrupt("simulated kill")

    figures, weights = {}, {}
    for run in ("a", "b"):
        model = student()
        figures[run] = train(model, make_train_ds, workdir=f"{workdir}/{run}",
                             val_ds=make_val_ds(), **kw)
        weights[run] = model.get_weights()
    try:
        train(student(), make_train_ds, workdir=f"{workdir}/c", val_ds=make_val_ds(),
              callbacks=[Crash(6)], **kw)
    except KeyboardInterrupt:
        pass
    saved = tf.train.latest_checkpoint(f"{workdir}/c/ckpt")
    rng_saved = any(name.startswith("rng/") for name, _ in tf.train.list_variables(saved))
    model = student()
    figures["resumed"] = train(model, make_train_ds, workdir=f"{workdir}/c",
                               val_ds=make_val_ds(), **kw)
    weights["resumed"] = model.get_weights()

    def max_rel(x, y):
        return max(float(np.max(np.abs(p - q) / (np.abs(q) + 1e-12))) for p, q in zip(x, y))

    with open(out, "w") as f:
        json.dump(dict(figures=figures, saved=saved, rng_saved=rng_saved,
                       weights_rel_b=max_rel(weights["b"], weights["a"]),
                       weights_rel_resumed=max_rel(weights["resumed"], weights["a"]),
                       same_seed_same_init=student(0).get_weights()[0].tolist()
                       == student(0).get_weights()[0].tolist(),
                       other_seed_other_init=student(0).get_weights()[0].tolist()
                       != student(1).get_weights()[0].tolist()), f)


def multi_worker_model():
    """The student of the multi-worker test: no BatchNorm, so its update does not depend on how
    the global batch is split between the workers."""
    from tests.compress.train_helpers import tiny_vit

    return tiny_vit(name="mw_student")


def multi_worker(workdir, init_h5, steps, ckpt_every, sleep_s, out_prefix):
    import numpy as np
    from tests.compress.train_helpers import make_train_ds

    from compress.training import get_strategy, train

    strategy = get_strategy("multi_worker")
    task = strategy.cluster_resolver.task_id
    with strategy.scope():
        student = multi_worker_model()
        student.load_weights(init_h5)

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(sleep_s)

    metrics = train(student, make_train_ds, steps=steps, workdir=workdir, lr=5e-3,
                    weight_decay=0.05, warmup_steps=2, strategy=strategy,
                    checkpoint_every=ckpt_every, eval_every=ckpt_every * 2,
                    callbacks=[Slow()] if sleep_s else [], verbose=False)
    metrics.update(pid=os.getpid(), replicas=strategy.num_replicas_in_sync)
    np.savez(f"{out_prefix}{task}.npz", *student.get_weights())
    with open(f"{out_prefix}{task}.json", "w") as f:
        json.dump(metrics, f)


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        resume(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    elif sys.argv[1] == "mirrored":
        mirrored(sys.argv[2])
    elif sys.argv[1] == "seeded":
        seeded(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "multi_worker":
        multi_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                     float(sys.argv[6]), sys.argv[7])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
