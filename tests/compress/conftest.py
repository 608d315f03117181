"""Tiny models for the compression tests, built from our own layers and block functions."""

import numpy as np
import pytest

from models.compat import keras
from models.layers import LayerScale
from models.vit import build_vit

TINY_VIT = dict(dim=32, depth=1, heads=2, mlp_dim=64, input_size=32, num_classes=5)


def tiny_vit(seed=0):
    keras.utils.set_random_seed(seed)
    return build_vit(**TINY_VIT)


def tiny_convnet(seed=0, size=16):
    """Conv+BN+depthwise stem and a block with every stock merge/glue layer the students use."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = L.ZeroPadding2D(1, name="stem_pad")(inputs)
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="stem_bn")(x)
    x = L.Activation("swish", name="stem_act")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="b1_dw")(x)
    y = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="b1_dw_bn")(y)
    y = L.ReLU(max_value=6.0, name="b1_relu6")(y)
    y = L.Conv2D(8, 1, use_bias=False, name="b1_pw")(y)
    y = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="b1_pw_bn")(y)
    y = LayerScale(0.5, name="b1_ls")(y)
    x = L.Add(name="b1_add")([x, y])
    p = L.AveragePooling2D(3, strides=1, padding="same", name="pool")(x)
    d = L.Subtract(name="pool_sub")([p, x])
    m = L.Multiply(name="gate")([x, L.Activation("sigmoid", name="gate_act")(d)])
    a = L.Average(name="avg")([m, x])
    c = L.Concatenate(name="cat")([a, x])  # 16 channels
    t = L.Reshape((-1, 16), name="tokens")(c)
    t = L.LayerNormalization(epsilon=1e-5, name="tok_ln")(t)
    t = L.Dense(16, name="tok_fc", activation="gelu")(t)
    t = L.Softmax(axis=-1, name="tok_softmax")(t)
    t = L.Permute((2, 1), name="tok_permute")(t)
    t = L.Permute((2, 1), name="tok_unpermute")(t)
    t = L.GlobalAveragePooling1D(name="tok_gap")(t)
    g = L.GlobalAveragePooling2D(name="gap")(c)
    g = L.Concatenate(name="feat")([g, t])
    g = L.Dropout(0.1, name="drop")(g)
    out = L.Dense(4, name="head")(g)
    return keras.Model(inputs, out, name="tiny_convnet")


@pytest.fixture
def images():
    def make(n, size, seed=0):
        return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)
    return make
