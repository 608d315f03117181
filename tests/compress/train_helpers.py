"""Synthetic stand-ins for `experiments.data` and tiny models, shared by the
training/distillation tests and their subprocess workers."""

from __future__ import annotations

import json
import socket

from models.compat import keras, tf

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


def tiny_convnet(num_classes=5, *, input_size=None, two_heads=False, dropout=0.0, name="tiny"):
    shape = (input_size, input_size, 3) if input_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="valid", name=f"{name}_conv1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn1")(x)
    x = keras.layers.Activation("relu", name=f"{name}_relu1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="valid", name=f"{name}_conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_drop")(x)
    out = keras.layers.Dense(num_classes, name=f"{name}_head")(x)
    if two_heads:
        dist = keras.layers.Dense(num_classes, name=f"{name}_dist_head")(x)
        return keras.Model(inputs, [out, dist], name=name)
    return keras.Model(inputs, out, name=name)


def tiny_vit(num_classes=5, *, input_size=None, name="tiny_vit"):
    from models.vit import build_vit

    return build_vit(dim=32, depth=1, heads=2, mlp_dim=64, num_classes=num_classes,
                     input_size=input_size, name=name)


def local_cluster(n):
    """TF_CONFIG values of the `n` tasks of a MultiWorkerMirroredStrategy cluster on loopback
    ports free right now (bound to port 0, then released for the workers)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    workers = [f"localhost:{s.getsockname()[1]}" for s in socks]
    for s in socks:
        s.close()
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
            for i in range(n)]
