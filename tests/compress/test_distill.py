"""Distillation losses (against NumPy formulas written from DeiT / Hinton, not from our code) and
the `Distiller`'s train/test steps on tiny models."""

import numpy as np
import pytest
from tests.compress.train_helpers import make_train_ds, tiny_convnet, tiny_vit

from compress.distill import Distiller, distillation_loss, kd_loss, label_loss, logits_from_topk
from models.compat import keras, tf


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_soft_kd(s, t, temp):
    """Hinton: T^2 * KL(p_t || p_s) at temperature T, summed over classes, per example."""
    lt, ls = np_log_softmax(t / temp), np_log_softmax(s / temp)
    return temp**2 * (np.exp(lt) * (lt - ls)).sum(-1)


@pytest.fixture
def logits(rng):
    return tuple(rng.normal(0, 3, (6, 10)).astype("float32") for _ in range(2))


def test_soft_kd_is_zero_when_student_equals_teacher(logits):
    s, _ = logits
    kd = kd_loss(s, s, kind="soft", temperature=2.0).numpy()
    np.testing.assert_allclose(kd, 0.0, atol=1e-5)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_soft_kd_matches_reference_with_t_squared(logits, temp):
    s, t = logits
    got = kd_loss(s, t, kind="soft", temperature=temp).numpy()
    np.testing.assert_allclose(got, np_soft_kd(s, t, temp), rtol=1e-4, atol=1e-6)
    # The T^2 factor: KL at temperature T alone (no factor) is T^2 times smaller.
    lt, ls = np_log_softmax(t / temp), np_log_softmax(s / temp)
    plain_kl = (np.exp(lt) * (lt - ls)).sum(-1)
    np.testing.assert_allclose(got, temp**2 * plain_kl, rtol=1e-4, atol=1e-6)


def test_soft_kd_is_num_classes_times_deit(logits):
    """DeiT divides the summed KL by batch * classes; we divide by batch (module docstring)."""
    s, t = logits
    temp = 2.0
    lt, ls = np_log_softmax(t / temp), np_log_softmax(s / temp)
    deit = (np.exp(lt) * (lt - ls)).sum() * temp**2 / s.size
    ours = kd_loss(s, t, kind="soft", temperature=temp).numpy().mean()
    np.testing.assert_allclose(ours, deit * s.shape[1], rtol=1e-4)


def test_hard_kd_is_cross_entropy_on_teacher_argmax(logits):
    s, t = logits
    target = t.argmax(-1)
    want = -np_log_softmax(s)[np.arange(len(s)), target]
    got = kd_loss(s, t, kind="hard", temperature=5.0).numpy()  # temperature plays no part
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_label_loss_smoothing_int_and_soft_labels(logits):
    s, _ = logits
    y = np.array([0, 3, 9, 2, 2, 5])
    eps, c = 0.1, s.shape[1]
    target = np.full_like(s, eps / c)
    target[np.arange(len(y)), y] += 1 - eps
    want = -(target * np_log_softmax(s)).sum(-1)
    np.testing.assert_allclose(label_loss(tf.constant(y, tf.int32), s, label_smoothing=eps),
                               want, rtol=1e-5)
    onehot = np.eye(c, dtype="float32")[y]
    np.testing.assert_allclose(label_loss(onehot, s, label_smoothing=eps), want, rtol=1e-5)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_total_is_weighted_sum(logits, kind):
    s, t = logits
    y = tf.constant([1, 2, 3, 4, 5, 6], tf.int32)
    total, lab, kd = distillation_loss(y, s, None, t, kind=kind, alpha=0.3, temperature=2.0,
                                       label_smoothing=0.1)
    np.testing.assert_allclose(total, 0.7 * lab.numpy() + 0.3 * kd.numpy(), rtol=1e-6)
    np.testing.assert_allclose(kd, kd_loss(s, t, kind=kind, temperature=2.0), rtol=1e-6)


def test_none_ignores_teacher_and_rejects_missing_teacher(logits):
    s, t = logits
    y = tf.constant([1, 2, 3, 4, 5, 6], tf.int32)
    total, lab, kd = distillation_loss(y, s, None, t, kind="none", alpha=0.5)
    np.testing.assert_allclose(total, lab)
    assert np.all(kd.numpy() == 0)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(y, s, None, None, kind="soft")
    with pytest.raises(ValueError, match="kind"):
        kd_loss(s, t, kind="mse")


def _batch(n=8, size=32, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, size, size, 3), dtype="float32"),
            rng.integers(0, classes, n).astype("int32"))


def test_distiller_kd_zero_for_identical_teacher():
    keras.backend.clear_session()
    student = tiny_vit(input_size=None, name="student")  # no BN/dropout: train == inference
    teacher = tiny_vit(input_size=None, name="teacher")
    teacher.set_weights(student.get_weights())
    d = Distiller(student, teacher, kind="soft", alpha=0.5, temperature=3.0)
    d.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = d.train_on_batch(*_batch(), return_dict=True)
    assert abs(logs["step_kd_loss"]) < 1e-5
    assert logs["step_label_loss"] > 0.1
    np.testing.assert_allclose(logs["step_loss"], 0.5 * logs["step_label_loss"], rtol=1e-5)


def test_distiller_trains_student_only_and_resizes_for_teacher():
    keras.backend.clear_session()
    student = tiny_convnet()
    teacher = tiny_vit(input_size=48)  # fixed size: the 32 px batch must be resized to 48
    d = Distiller(student, teacher, kind="hard", alpha=0.5)
    assert d.teacher_size == 48 and not teacher.trainable
    t_before = [w.copy() for w in teacher.get_weights()]
    s_before = [w.copy() for w in student.get_weights()]
    d.compile(optimizer=keras.optimizers.Adam(1e-2))
    d.fit(make_train_ds(0), steps_per_epoch=4, epochs=1, verbose=0)
    for a, b in zip(t_before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(s_before, student.get_weights()))
    x, _ = _batch(size=32)
    want = teacher(tf.image.resize(x, (48, 48)), training=False).numpy()
    np.testing.assert_allclose(d.teacher_logits(x).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha, frozen", [(1.0, "tiny_head"), (0.0, "tiny_dist_head")])
def test_two_head_student_routes_losses(alpha, frozen):
    """alpha=1: only KD, which the distill head takes, so the class head gets no gradient;
    alpha=0: only the label loss, on the class head, so the distill head gets none."""
    keras.backend.clear_session()
    student = tiny_convnet(two_heads=True)
    teacher = tiny_convnet(name="teacher")
    d = Distiller(student, teacher, kind="soft", alpha=alpha, temperature=2.0)
    d.compile(optimizer=keras.optimizers.SGD(0.5))
    before = {l.name: [w.copy() for w in l.get_weights()] for l in student.layers}
    d.train_on_batch(*_batch())
    for name in ("tiny_head", "tiny_dist_head"):
        changed = max(np.abs(a - b).max()
                      for a, b in zip(before[name], student.get_layer(name).get_weights()))
        if name == frozen:
            assert changed == 0.0, name
        else:
            assert changed > 1e-6, name


def test_two_head_eval_averages_heads():
    keras.backend.clear_session()
    student = tiny_convnet(two_heads=True)
    d = Distiller(student)
    d.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y = _batch(n=32, seed=3)
    cls, dist = (o.numpy() for o in student(x, training=False))
    want = ((cls + dist) / 2).argmax(-1) == y
    res = d.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    np.testing.assert_allclose(res["accuracy"], want.mean(), atol=1e-6)
    np.testing.assert_allclose(d(x).numpy(), (cls + dist) / 2, rtol=1e-5, atol=1e-6)


def test_distiller_soft_labels():
    keras.backend.clear_session()
    d = Distiller(tiny_convnet(), tiny_convnet(name="t"), kind="soft", alpha=0.5)
    d.compile(optimizer=keras.optimizers.Adam(1e-3))
    hist = d.fit(make_train_ds(0, soft=True), steps_per_epoch=3, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"]).all() and np.isfinite(hist.history["kd_loss"]).all()


def test_distiller_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs a teacher"):
        Distiller(tiny_convnet(), kind="soft")
    with pytest.raises(ValueError, match="alpha"):
        Distiller(tiny_convnet(), tiny_convnet(name="t"), kind="soft", alpha=1.5)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_cached_exact_logits_give_the_online_loss(kind):
    """A batch carrying the teacher's logits on the same images (top-k with k = classes, as a
    teacher cache stores them for Imagenette) trains exactly like the online teacher."""
    keras.backend.clear_session()
    teacher = tiny_vit(input_size=None, name="teacher")
    x, y = _batch()
    top = tf.math.top_k(teacher(x, training=False), k=5)
    losses = []
    for cached in (False, True):
        keras.utils.set_random_seed(1)  # the same student both times
        student = tiny_convnet(name="student")
        d = Distiller(student, None if cached else teacher, kind=kind, alpha=0.4,
                      temperature=2.0, teacher_from_data=cached)
        d.compile(optimizer=keras.optimizers.SGD(0.0))
        data = (x, y, (top.values, top.indices)) if cached else (x, y)
        hist = d.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0)
        losses.append([hist.history[k][0] for k in ("step_loss", "step_kd_loss")])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert losses[0][1] > 1e-3


def test_logits_from_topk_renormalise_the_teacher_over_its_top_k(logits):
    _, t = logits
    top = tf.math.top_k(t, k=3)
    full = logits_from_topk(top.values, top.indices, 10).numpy()
    p = np.exp(np_log_softmax(full / 2.0))
    keep = np.argsort(-t, -1)[:, :3]
    want = np.exp(np_log_softmax(np.take_along_axis(t, keep, -1) / 2.0))
    np.testing.assert_allclose(np.take_along_axis(p, keep, -1), want, rtol=1e-5)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(full.argmax(-1), t.argmax(-1))
    with pytest.raises(ValueError, match="batches must be"):
        d = Distiller(tiny_convnet(), kind="soft", teacher_from_data=True)
        d.compile(optimizer=keras.optimizers.SGD(0.0))
        d.train_on_batch(*_batch())
