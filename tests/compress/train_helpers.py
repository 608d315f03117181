"""Synthetic stand-ins for `experiments.data`, shared by the training/distillation tests and
their subprocess workers (the tiny models and `local_cluster`: tests/helpers.py, re-exported)."""

from __future__ import annotations

from models.compat import tf
from tests.helpers import local_cluster, tiny_convnet, tiny_vit  # noqa: F401

SIZES = (32, 48, 64)  # multi-scale plan of the stand-in sampler
PIXELS = 8 * 48 * 48  # constant pixels per batch, as the ml-cvnets sampler


def plan(step):
    """(size, batch) of a global step, a tensor function of the step like the real sampler's."""
    sizes = tf.constant(SIZES, tf.int32)
    size = tf.gather(sizes, tf.cast(step % len(SIZES), tf.int32))
    batch = (PIXELS // (size * size)) // 2 * 2  # even: splits over 2 replicas
    return size, batch


def make_train_ds(start_step=0, *, num_classes=5, multiscale=True, fixed_size=32, batch=8,
                  soft=False):
    """Infinite `(images [b,s,s,3] in [0,1], labels)` whose batch k is a function of step k.

    Labels depend on the mean of a colour channel, so a model can learn them.
    """

    def make(step):
        if multiscale:
            size, b = plan(step)
        else:
            size, b = tf.constant(fixed_size), tf.constant(batch)
        seed = tf.stack([tf.cast(step, tf.int32), 7])
        images = tf.random.stateless_uniform(tf.stack([b, size, size, 3]), seed)
        channel = tf.reduce_mean(images[..., 0], axis=[1, 2])
        score = (channel - 0.49) * 2.0 * num_classes / 0.04 + num_classes / 2
        labels = tf.cast(tf.clip_by_value(score, 0, num_classes - 1), tf.int32)
        if soft:
            return images, tf.one_hot(labels, num_classes) * 0.8 + 0.2 / num_classes
        return images, labels

    return tf.data.Dataset.counter(start_step).map(make)


def make_val_ds(*, num_classes=5, size=32, n=16, batch=8):
    return make_train_ds(0, num_classes=num_classes, multiscale=False, fixed_size=size,
                         batch=batch).take(n // batch)
