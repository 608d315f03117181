"""Mobile-Former: every piece checked against a NumPy reference written from the equations of
the reference code (PyTorch layout: features NCHW, PyTorch weight layouts), then whole-model
behaviour and TFLite conversion.

The NumPy side works in the reference's own layout (channel-first maps, `view(bs, heads, C/heads,
HW)` head splits, `(out, in/groups)` grouped 1x1 weights, `(C*m, 3, 3)` expanding depthwise
weights), so the NHWC reshapes, head splits, group splits and shuffles of the Keras code are
checked, not restated.
"""

import math

import numpy as np
import pytest

import models
from models.compat import keras, tf
from models import mobile_former as mf
from tests.helpers import load_images, run_tflite

ERF = np.vectorize(math.erf)
BN_EPS = LN_EPS = 1e-5


# --- NumPy reference (float64) ----------------------------------------------------------------

def softmax(a, axis=-1):
    a = np.exp(a - a.max(axis, keepdims=True))
    return a / a.sum(axis, keepdims=True)


def hsig(x):
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def hswish(x):
    return x * hsig(x)


def dense(x, w):
    return x @ w[0] + w[1]


def layer_norm(x, w):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * w[0] + w[1]


def batch_norm(x, w, axis=1):
    gamma, beta, mean, var = (v.reshape([-1 if i == axis else 1 for i in range(x.ndim)]) for v in w)
    return (x - mean) / np.sqrt(var + BN_EPS) * gamma + beta


def torch_pw(W, name, groups):
    """PyTorch 1x1 weight (out, in/groups) assembled from the Keras layer(s)."""
    if groups == 1:
        return W[name][0][0, 0].T
    return np.concatenate([W[f"{name}_g{i}"][0][0, 0].T for i in range(groups)], axis=0)


def conv_pw(x, wt, groups):
    """PyTorch Conv2d(k=1, groups) on NCHW."""
    cin, cout = x.shape[1], wt.shape[0]
    ig, og = cin // groups, cout // groups
    return np.concatenate([np.einsum("oi,bihw->bohw", wt[g * og:(g + 1) * og],
                                     x[:, g * ig:(g + 1) * ig]) for g in range(groups)], axis=1)


def conv_dw(x, k, stride):
    """PyTorch Conv2d(C, C*m, 3, stride, padding=1, groups=C) on NCHW; k is the Keras
    depthwise kernel (3, 3, C, m), turned into the PyTorch (C*m, 3, 3) weight here, or the
    (3, 3, C*m, 1) kernel of the plain depthwise conv after a ChannelRepeat(m) (stride 1)."""
    c = x.shape[1]
    if k.shape[2] != c:  # ChannelRepeat + depthwise: output channel c*m + j, as the multiplier
        k = k.reshape(3, 3, c, k.shape[2] // c)
    m = k.shape[3]
    wt = k.transpose(2, 3, 0, 1).reshape(c * m, 3, 3)  # out channel o reads input o // m
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2] // stride, x.shape[3] // stride
    src = xp[:, np.arange(c * m) // m]
    out = np.zeros((x.shape[0], c * m, h, w))
    for u in range(3):
        for v in range(3):
            tap = src[:, :, u:u + stride * h:stride, v:v + stride * w:stride]
            out += tap * wt[None, :, u, v, None, None]
    return out


def conv_stem(x, k):
    """PyTorch Conv2d(3, C, 3, stride 2, padding 1) on NCHW; k is the Keras (3, 3, in, out)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2] // 2, x.shape[3] // 2
    out = 0
    for u in range(3):
        for v in range(3):
            out = out + np.einsum("bihw,io->bohw", xp[:, :, u:u + 2 * h:2, v:v + 2 * w:2], k[u, v])
    return out


def shuffle(x, g):
    b, c, h, w = x.shape
    return x.reshape(b, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(b, c, h, w)


def ref_mobile_to_former(f, z, W, p, heads=2):
    b, c, h, w = f.shape
    t = z.shape[1]
    q = dense(z, W[f"{p}_q"]).reshape(b, t, heads, c // heads).transpose(0, 2, 1, 3)
    k = f.reshape(b, heads, c // heads, h * w)  # keys = values = raw features
    attn = softmax((q @ k) * (c // heads) ** -0.5)  # [b, heads, T, HW]
    out = (attn @ k.transpose(0, 1, 3, 2)).transpose(0, 2, 1, 3).reshape(b, t, c)
    out = out * 2.0 * hsig(dense(z, W[f"{p}_gate"]))
    return layer_norm(z + dense(out, W[f"{p}_proj"]), W[f"{p}_ln"])


def ref_former(z, W, p, heads=4):
    b, t, d = z.shape
    q = dense(z, W[f"{p}_q"]).reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
    k = z.transpose(0, 2, 1).reshape(b, heads, d // heads, t)  # keys = values = tokens
    attn = softmax((q @ k) * (d // heads) ** -0.5)
    out = (attn @ k.transpose(0, 1, 3, 2)).transpose(0, 2, 1, 3).reshape(b, t, d)
    z = layer_norm(z + dense(out, W[f"{p}_proj"]), W[f"{p}_ln1"])
    y = dense(z, W[f"{p}_ffn_fc1"])
    y = 0.5 * y * (1.0 + ERF(y / np.sqrt(2.0)))
    return layer_norm(z + dense(y, W[f"{p}_ffn_fc2"]), W[f"{p}_ln2"])


def ref_former_to_mobile(f, z, W, p, heads=2):
    b, c, h, w = f.shape
    t = z.shape[1]
    q = f.reshape(b, heads, c // heads, h * w).transpose(0, 1, 3, 2)  # [b, heads, HW, c/h]
    k = dense(z, W[f"{p}_k"]).transpose(0, 2, 1).reshape(b, heads, c // heads, t)
    v = dense(z, W[f"{p}_v"]).transpose(0, 2, 1).reshape(b, heads, c // heads, t)
    attn = softmax((q @ k) * (c // heads) ** -0.5)  # softmax over the tokens
    out = attn @ v.transpose(0, 1, 3, 2)  # [b, heads, HW, c/h]
    return f + out.transpose(0, 1, 3, 2).reshape(b, c, h, w)


def ref_dyrelu(x, t0, W, p):
    c = x.shape[1]
    a = hsig(dense(np.maximum(dense(t0, W[f"{p}_fc1"]), 0.0), W[f"{p}_fc2"]))
    a1 = (a[:, :c] - 0.5) * 2.0 + 1.0
    a2 = (a[:, c:] - 0.5) * 2.0
    return np.maximum(x * a1[:, :, None, None], x * a2[:, :, None, None])


def ref_conv_alone(f, W, p, out, stride, e1, groups):
    y = np.clip(batch_norm(conv_dw(f, W[f"{p}_conv1"][0], stride), W[f"{p}_conv1_bn"]), 0, 6)
    if groups > 1:
        y = shuffle(y, f.shape[1])
    y = batch_norm(conv_pw(y, torch_pw(W, f"{p}_conv2", groups), groups), W[f"{p}_conv2_bn"])
    return y + f if stride == 1 and f.shape[1] == out else y


def ref_dna_block(f, z, W, p, *, out, stride, e1, e2, groups):
    if e1 == 1 or e2 == 0:
        return ref_conv_alone(f, W, p, out, stride, e1, groups), z
    z = ref_former(ref_mobile_to_former(f, z, W, f"{p}_l2g"), W, f"{p}_former")
    y = batch_norm(conv_pw(f, torch_pw(W, f"{p}_conv1", groups), groups), W[f"{p}_conv1_bn"])
    y = shuffle(y, groups) if groups > 1 else y
    y = ref_dyrelu(y, z[:, 0], W, f"{p}_hyper1")
    y = batch_norm(conv_dw(y, W[f"{p}_conv2"][0], stride), W[f"{p}_conv2_bn"])
    y = ref_dyrelu(y, z[:, 0], W, f"{p}_hyper2")
    y = batch_norm(conv_pw(y, torch_pw(W, f"{p}_conv3", groups), groups), W[f"{p}_conv3_bn"])
    y = shuffle(y, groups) if groups > 1 else y
    if stride == 1 and f.shape[1] == out:
        y = y + f  # identity before the bridge (gbr_before_skip=False)
    return ref_former_to_mobile(y, z, W, f"{p}_g2l"), z


def ref_dna_block3(f, z, W, p, *, out, stride, e1, e2, groups):
    if e1 == 1 or e2 == 0:
        return ref_conv_alone(f, W, p, out, stride, e1, groups), z
    z = ref_former(ref_mobile_to_former(f, z, W, f"{p}_l2g"), W, f"{p}_former")
    y = batch_norm(conv_dw(f, W[f"{p}_conv1"][0], stride), W[f"{p}_conv1_bn"])
    y = shuffle(y, f.shape[1]) if groups > 1 else y
    y = ref_dyrelu(y, z[:, 0], W, f"{p}_hyper1")
    skip = batch_norm(conv_pw(y, torch_pw(W, f"{p}_conv2", groups), groups), W[f"{p}_conv2_bn"])
    y = batch_norm(conv_dw(skip, W[f"{p}_conv3"][0], 1), W[f"{p}_conv3_bn"])
    y = shuffle(y, out) if groups > 1 else y
    y = ref_dyrelu(y, z[:, 0], W, f"{p}_hyper3")
    y = batch_norm(conv_pw(y, torch_pw(W, f"{p}_conv4", groups), groups), W[f"{p}_conv4_bn"])
    y = ref_former_to_mobile(y + skip, z, W, f"{p}_g2l")
    if stride == 1 and f.shape[1] == out:
        y = y + f  # identity after the bridge
    return y, z


def ref_model(img, W, cfg):
    """The whole classifier; img NHWC in, logits out."""
    f = img.transpose(0, 3, 1, 2)
    z = np.broadcast_to(W["tokens"][0][None], (img.shape[0],) + W["tokens"][0].shape)
    f = np.clip(batch_norm(conv_stem(f, W["stem_conv"][0]), W["stem_bn"]), 0, 6)
    for i, (kind, e1, out, stride, e2) in enumerate(cfg["rows"], start=1):
        block = ref_dna_block3 if kind == "3" else ref_dna_block
        f, z = block(f, z, W, f"block{i}", out=out, stride=stride, e1=e1, e2=e2,
                     groups=cfg["groups"])
    z = ref_mobile_to_former(f, z, W, "final_l2g")
    g = cfg["groups"]
    f = shuffle(f, g) if g > 1 else f
    f = batch_norm(conv_pw(f, torch_pw(W, "head_conv", g), g), W["head_conv_bn"])
    x = hswish(np.clip(f, 0, 6).mean(axis=(2, 3)))
    x = np.concatenate([x, z[:, 0]], axis=1)
    x = hswish(batch_norm(dense(x, W["head_fc"]), W["head_fc_bn"]))
    return dense(x, W["head"])


# --- helpers --------------------------------------------------------------------------------

def randomize(model, rng):
    """Random weights everywhere (BN statistics too) so no piece is an identity."""
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            new = [1 + 0.2 * rng.standard_normal(ws[0].shape),
                   0.2 * rng.standard_normal(ws[1].shape)]
            if len(ws) == 4:
                new += [0.2 * rng.standard_normal(ws[2].shape), rng.uniform(0.5, 1.5, ws[3].shape)]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            new = [rng.standard_normal(ws[0].shape) / 3.0]
        else:
            new = [rng.standard_normal(w.shape) / math.sqrt(np.prod(w.shape[:-1])) if w.ndim > 1
                   else 0.1 * rng.standard_normal(w.shape) for w in ws]
        layer.set_weights([n.astype("float32") for n in new])


def weights_by_name(model):
    return {l.name: [w.astype("float64") for w in l.get_weights()]
            for l in model.layers if l.weights}


def piece_model(fn, feat_shape, tok_shape):
    x = keras.Input(feat_shape, name="x")
    z = keras.Input(tok_shape, name="z")
    return keras.Model([x, z], fn(x, z))


TOL = dict(rtol=1e-4, atol=2e-5)


# --- pieces -----------------------------------------------------------------------------------

def test_mobile_to_former_matches_reference(rng):
    model = piece_model(lambda x, z: mf.mobile_to_former(x, z, name="l2g"), (6, 5, 12), (3, 16))
    randomize(model, rng)
    f, z = rng.standard_normal((2, 6, 5, 12)), rng.standard_normal((2, 3, 16))
    ref = ref_mobile_to_former(f.transpose(0, 3, 1, 2), z, weights_by_name(model), "l2g")
    got = model([f.astype("float32"), z.astype("float32")]).numpy()
    np.testing.assert_allclose(got, ref, **TOL)
    # the gate and the post-LN are really there: zeroing the gate leaves LN(z + proj bias)
    gate = model.get_layer("l2g_gate")
    gate.set_weights([np.zeros_like(w) for w in gate.get_weights()])  # 2*hsig(0) = 1
    ref1 = ref_mobile_to_former(f.transpose(0, 3, 1, 2), z, weights_by_name(model), "l2g")
    got1 = model([f.astype("float32"), z.astype("float32")]).numpy()
    np.testing.assert_allclose(got1, ref1, **TOL)
    assert np.abs(got1 - got).max() > 1e-3
    # post-LN: with a unit LayerNorm every output token has mean 0 and variance 1
    model.get_layer("l2g_ln").set_weights([np.ones(16, "float32"), np.zeros(16, "float32")])
    got2 = model([f.astype("float32"), z.astype("float32")]).numpy()
    np.testing.assert_allclose(got2.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(got2.var(-1), 1, atol=1e-3)


def test_former_matches_reference(rng):
    model = piece_model(lambda x, z: mf.former(z, name="former"), (2, 2, 4), (4, 32))
    randomize(model, rng)
    z = rng.standard_normal((3, 4, 32))
    ref = ref_former(z, weights_by_name(model), "former")
    got = model([np.zeros((3, 2, 2, 4), "float32"), z.astype("float32")]).numpy()
    np.testing.assert_allclose(got, ref, **TOL)


def test_former_to_mobile_matches_reference(rng):
    model = piece_model(lambda x, z: mf.former_to_mobile(x, z, name="g2l"), (4, 6, 16), (6, 24))
    randomize(model, rng)
    f, z = rng.standard_normal((2, 4, 6, 16)), rng.standard_normal((2, 6, 24))
    ref = ref_former_to_mobile(f.transpose(0, 3, 1, 2), z, weights_by_name(model), "g2l")
    got = model([f.astype("float32"), z.astype("float32")]).numpy()
    np.testing.assert_allclose(got, ref.transpose(0, 2, 3, 1), **TOL)


def dyrelu_model():
    def fn(x, z):
        t0 = models.vit.TakeToken(0, name="t0")(z)
        return mf.dynamic_relu(x, t0, name="hyper", act_name="dyrelu")
    return piece_model(fn, (5, 5, 8), (3, 16))


def test_dynamic_relu_matches_reference(rng):
    model = dyrelu_model()
    randomize(model, rng)
    x, z = rng.standard_normal((2, 5, 5, 8)), 3 * rng.standard_normal((2, 3, 16))
    ref = ref_dyrelu(x.transpose(0, 3, 1, 2), z[:, 0], weights_by_name(model), "hyper")
    got = model([x.astype("float32"), z.astype("float32")]).numpy()
    np.testing.assert_allclose(got, ref.transpose(0, 2, 3, 1), **TOL)
    assert np.abs(got - np.maximum(x, 0)).max() > 1e-2  # not a plain ReLU with random weights


def test_dynamic_relu_with_a_half_is_relu(rng):
    x = rng.standard_normal((2, 4, 4, 6)).astype("float32")
    layer = mf.DynamicReLU()
    np.testing.assert_array_equal(layer([x, np.full((2, 12), 0.5, "float32")]).numpy(),
                                  np.maximum(x, 0))
    # through the hyper MLP: a zero last layer gives h-sigmoid(0) = 0.5, whatever the tokens
    model = dyrelu_model()
    randomize(model, rng)
    fc2 = model.get_layer("hyper_fc2")
    fc2.set_weights([np.zeros_like(w) for w in fc2.get_weights()])
    x2 = rng.standard_normal((2, 5, 5, 8)).astype("float32")
    got = model([x2, 3 * rng.standard_normal((2, 3, 16)).astype("float32")]).numpy()
    np.testing.assert_allclose(got, np.maximum(x2, 0), atol=1e-7)
    # slopes: a1 = 2a in [0, 2] on x > 0, a2 = 2a - 1 in [-1, 1] on x < 0 (max of the two)
    a = np.concatenate([np.ones((2, 6)), np.zeros((2, 6))], 1).astype("float32")
    np.testing.assert_allclose(layer([x, a]).numpy(), np.where(x > 0, 2 * x, -x), atol=1e-6)


def test_channel_shuffle_and_grouped_conv_match_pytorch_semantics(rng):
    x = rng.standard_normal((2, 3, 5, 24)).astype("float32")
    got = mf.ChannelShuffle(4)(x).numpy()
    ref = shuffle(x.transpose(0, 3, 1, 2), 4).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, ref)
    inp = keras.Input((None, None, 24))
    model = keras.Model(inp, mf.pointwise_conv_bn(inp, 36, groups=4, name="pw"))
    randomize(model, rng)
    W = weights_by_name(model)
    assert sum(np.prod(w.shape) for w in model.trainable_weights) == 24 * 36 // 4 + 2 * 36
    ref = batch_norm(conv_pw(x.transpose(0, 3, 1, 2).astype("float64"), torch_pw(W, "pw", 4), 4),
                     W["pw_bn"])
    np.testing.assert_allclose(model(x).numpy(), ref.transpose(0, 2, 3, 1), **TOL)


def test_channel_repeat_is_tf_repeat_and_feeds_a_plain_depthwise_conv(rng):
    x = rng.standard_normal((2, 5, 7, 6)).astype("float32")
    np.testing.assert_array_equal(mf.ChannelRepeat(4)(x).numpy(), np.repeat(x, 4, axis=-1))
    inp = keras.Input((None, None, 6))
    for stride, repeat in ((1, True), (2, False)):
        model = keras.Model(inp, mf.depthwise_conv_bn(inp, multiplier=4, stride=stride,
                                                      name="dw"))
        kinds = [type(layer).__name__ for layer in model.layers]
        assert ("ChannelRepeat" in kinds) is repeat, kinds
        assert model.get_layer("dw").depth_multiplier == (1 if repeat else 4)
        # the same parameters as the reference's Conv2d(6, 24, 3, groups=6) + BN
        assert sum(np.prod(w.shape) for w in model.trainable_weights) == 24 * 9 + 2 * 24


BLOCK_CASES = [  # (block, in, out, stride, e1, e2, groups)
    ("D", 8, 8, 1, 3, 3, 1),
    ("D", 8, 16, 1, 4, 4, 4),
    ("3", 8, 16, 2, 6, 4, 1),
    ("3", 8, 8, 1, 6, 4, 4),
    ("3", 8, 8, 1, 2, 0, 1),   # conv-only, identity
    ("3", 8, 12, 2, 3, 0, 4),  # conv-only, shuffle + grouped
]


@pytest.mark.parametrize("kind,inp,out,stride,e1,e2,groups", BLOCK_CASES)
def test_dna_blocks_match_reference(rng, kind, inp, out, stride, e1, e2, groups):
    block = mf.dna_block3 if kind == "3" else mf.dna_block
    model = piece_model(lambda x, z: block(x, z, out=out, stride=stride, e1=e1, e2=e2,
                                           groups=groups, name="b"), (8, 8, inp), (3, 16))
    randomize(model, rng)
    f, z = rng.standard_normal((2, 8, 8, inp)), rng.standard_normal((2, 3, 16))
    ref_block = ref_dna_block3 if kind == "3" else ref_dna_block
    ref_f, ref_z = ref_block(f.transpose(0, 3, 1, 2), z, weights_by_name(model), "b", out=out,
                             stride=stride, e1=e1, e2=e2, groups=groups)
    got_f, got_z = (t.numpy() for t in model([f.astype("float32"), z.astype("float32")]))
    np.testing.assert_allclose(got_f, ref_f.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_z, ref_z, rtol=1e-4, atol=1e-4)


TINY = dict(rows=[("3", 2, 8, 1, 0), ("3", 6, 16, 2, 4), ("D", 3, 16, 1, 3), ("D", 4, 24, 1, 4)],
            stem=8, tokens=3, token_dim=16, num_features=32)


@pytest.mark.parametrize("groups", [1, 4])
def test_tiny_model_matches_reference(rng, groups):
    cfg = dict(TINY, groups=groups)
    model = mf.build_mobile_former(num_classes=5, **cfg)
    randomize(model, rng)
    img = rng.random((2, 64, 64, 3))
    ref = ref_model(img, weights_by_name(model), cfg)
    np.testing.assert_allclose(model(img.astype("float32")).numpy(), ref, rtol=1e-3, atol=1e-4)


# --- whole models -----------------------------------------------------------------------------

def test_configs_follow_the_reference_tables():
    info = {n: models.get_model_info(n) for n in models.list_models("mobile_former_*")}
    assert sorted(info) == sorted(f"mobile_former_{v}" for v in
                                  ("26m", "52m", "96m", "151m", "214m", "294m", "508m"))
    assert all((i.default_size, i.size_divisor, i.family) == (224, 32, "mobile_former")
               for i in info.values())
    # 508M widths printed from the official reference model
    model = models.create_model("mobile_former_508m", input_size=224)

    def dw(name):
        return model.get_layer(name).output_shape[-1]

    assert [dw(f"block2_conv{j}") for j in (1, 2, 3, 4)] == [144, 40, 160, 40]
    assert [dw("block3_conv1"), dw("block3_conv3")] == [120, 40]
    assert [dw("block10_conv1"), dw("block10_conv2"), dw("block10_conv3")] == [1056, 240, 960]
    assert [dw("block12_conv1"), dw("block12_conv3")] == [1440, 240]

    def per_block(prefix):
        return sum(int(np.prod(w.shape)) for l in model.layers if l.name.startswith(prefix)
                   for w in l.trainable_weights)

    assert per_block("block12_") == 1_466_016 and per_block("final_l2g_") == 139_296


@pytest.fixture(scope="module")
def model_52m():
    keras.backend.clear_session()
    return models.create_model("mobile_former_52m", num_classes=10)


@pytest.mark.parametrize("hw", [(160, 160), (224, 224), (256, 256), (192, 256)])
def test_any_multiple_of_32(model_52m, hw):
    out = model_52m(np.random.default_rng(hw[0]).random((2, *hw, 3), dtype="float32"))
    assert out.shape == (2, 10) and np.isfinite(out.numpy()).all()


def test_fixed_size_batch_of_one_dropout_and_layer_rules():
    keras.backend.clear_session()
    model = models.create_model("mobile_former_26m", num_classes=7, input_size=192, dropout=0.2)
    assert model.input_shape == (None, 192, 192, 3) and model.output_shape == (None, 7)
    out = model(np.random.default_rng(0).random((1, 192, 192, 3), dtype="float32"))
    assert out.shape == (1, 7) and np.isfinite(out.numpy()).all()
    assert model.get_layer("head_drop").rate == 0.2
    names = [l.name for l in model.layers]
    assert len(names) == len(set(names))
    kinds = {type(l).__name__ for l in model.layers}
    assert {"GroupSplit", "ChannelShuffle", "GlobalTokens", "DynamicReLU"} <= kinds
    assert not kinds & {"Lambda", "TFOpLambda", "MultiHeadAttention"}
    for layer in model.layers:  # custom layers: registered, declare their prunable weights
        if type(layer).__module__.startswith("models."):
            assert type(layer).__name__ in models.layers.CUSTOM_OBJECTS
            assert isinstance(layer.get_prunable_weights(), list)
            type(layer).from_config(layer.get_config())


def test_deterministic_and_batch_independent(model_52m, rng):
    imgs = rng.random((3, 224, 224, 3), dtype="float32")
    a, b = model_52m(imgs).numpy(), model_52m(imgs).numpy()
    np.testing.assert_array_equal(a, b)
    other = imgs.copy()
    other[1:] = rng.random((2, 224, 224, 3), dtype="float32")
    np.testing.assert_allclose(model_52m(other).numpy()[0], a[0], rtol=1e-5, atol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(model_52m(imgs[i:i + 1]).numpy()[0], a[i], rtol=1e-4, atol=1e-5)
    assert np.abs(a[0] - a[1]).max() > 0  # outputs do depend on the input


def test_save_and_reload_h5(tmp_path, rng):
    model = mf.build_mobile_former(num_classes=4, input_size=64, groups=4, **TINY)
    randomize(model, rng)
    img = rng.random((2, 64, 64, 3), dtype="float32")
    model.save(tmp_path / "m.h5")
    again = keras.models.load_model(tmp_path / "m.h5", custom_objects=models.layers.CUSTOM_OBJECTS)
    np.testing.assert_array_equal(again(img).numpy(), model(img).numpy())


# --- TFLite -----------------------------------------------------------------------------------

def tflite_ops(content):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    no_delegate = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = Interpreter(model_content=content, experimental_op_resolver_type=no_delegate)
    interp.allocate_tensors()
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    return interp._get_ops_details(), tensors


def assert_builtin_only(ops, tensors):
    names = {op["op_name"] for op in ops}
    assert not any(n.startswith("Flex") or n in ("CUSTOM", "DELEGATE") for n in names), names
    for op in ops:
        if op["op_name"] == "TRANSPOSE":
            assert len(tensors[op["inputs"][0]]["shape"]) <= 4
    return names


@pytest.fixture(scope="module")
def model_96m_224():
    keras.backend.clear_session()
    model = models.create_model("mobile_former_96m", num_classes=10, input_size=224)
    randomize(model, np.random.default_rng(1))
    return model


def fp32_file(model, size, folder):
    """The model's fp32 file through the project's `export_tflite`, as bytes."""
    from compress.tflite.convert import export_tflite

    export_tflite(model, folder / "fp32.tflite", fmt="fp32", input_size=size)
    return (folder / "fp32.tflite").read_bytes()


def test_tflite_fp32_builtin_and_matches_keras(model_96m_224, imagenette_dir, tmp_path):
    content = fp32_file(model_96m_224, 224, tmp_path)
    ops, tensors = tflite_ops(content)
    names = assert_builtin_only(ops, tensors)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "SOFTMAX"} <= names
    assert "MAXIMUM" not in names  # dynamic ReLU as MUL + fused RELU + ADD (int8 in XNNPACK)
    imgs = load_images(imagenette_dir, 2, 224)
    diff = np.abs(run_tflite(content, imgs) - model_96m_224(imgs).numpy()).max()
    assert diff < 1e-4, diff


@pytest.mark.slow
def test_tflite_int8_full_integer_builtin(model_96m_224, imagenette_dir):
    imgs = load_images(imagenette_dir, 4, 224)
    conv = tf.lite.TFLiteConverter.from_keras_model(model_96m_224)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([img[None]] for img in imgs)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    content = conv.convert()
    ops, tensors = tflite_ops(content)
    assert_builtin_only(ops, tensors)
    float_ops = [op["op_name"] for op in ops
                 if any(tensors[i]["dtype"] == np.float32 for i in op["outputs"])]
    assert not float_ops, float_ops  # full integer: no float op left
    out = run_tflite(content, imgs[:2])
    assert out.shape == (2, 10) and np.isfinite(out).all()


def check_grouped_form(model, size, folder):
    content = fp32_file(model, size, folder)
    ops, tensors = tflite_ops(content)
    names = assert_builtin_only(ops, tensors)
    assert {"SPLIT", "CONCATENATION", "TRANSPOSE"} <= names
    # no grouped CONV_2D: every conv's filter spans its whole input
    for op in ops:
        if op["op_name"] == "CONV_2D":
            assert tensors[op["inputs"][1]]["shape"][-1] == tensors[op["inputs"][0]]["shape"][-1]
    img = np.random.default_rng(0).random((1, size, size, 3), dtype="float32")
    np.testing.assert_allclose(run_tflite(content, img), model(img).numpy(), atol=1e-4)


def test_tflite_tiny_grouped_model_fp32_builtin(rng, tmp_path):
    """The 26M form (GroupSplit + per-group Conv2D + Concatenate, rank-4 shuffles) on a tiny
    config with every block kind: a conversion of a few seconds for the fast tier."""
    keras.backend.clear_session()
    model = mf.build_mobile_former(num_classes=10, input_size=64, groups=4, **TINY)
    randomize(model, rng)
    check_grouped_form(model, 64, tmp_path)


@pytest.mark.slow
def test_tflite_26m_grouped_form_fp32_builtin(tmp_path):
    keras.backend.clear_session()
    model = models.create_model("mobile_former_26m", num_classes=10, input_size=224)
    check_grouped_form(model, 224, tmp_path)


def test_bridges_never_pack_the_feature_map(tmp_path):
    """Every BATCH_MATMUL that reads a feature map has it as the left-hand operand, which XNNPACK
    uses in place; the right-hand one, packed at each invoke, is the small token-side operand.
    (The converter swaps the operands of a matmul followed by a transpose: the bridges are laid
    out so that it has nothing to swap.)"""
    from compress.tflite.convert import export_tflite
    from compress.tflite.flatbuffer import TFLiteFile

    keras.backend.clear_session()
    model = mf.build_mobile_former(num_classes=4, input_size=64, groups=1, **TINY)
    export_tflite(model, tmp_path / "mf.tflite", fmt="fp32", input_size=64)
    f = TFLiteFile(tmp_path / "mf.tflite")
    pixels = {32 * 32, 16 * 16}  # the stages' HW at 64 px
    bmms = [op for op in f.ops if op.type == "BATCH_MATMUL"]
    map_bmms = [op for op in bmms
                if any(set(f.tensors[i].shape) & pixels for i in op.inputs[:2])]
    assert len(map_bmms) == 3 * 4 + 2  # 3 bridged blocks x 2 bridges x 2 matmuls + final_l2g
    for op in map_bmms:
        lhs, rhs = (f.tensors[i] for i in op.inputs[:2])
        assert np.prod(rhs.shape) < np.prod(lhs.shape), (lhs.name, lhs.shape, rhs.shape)


def test_head_blocks_and_head_diagonal_invert_each_other(rng):
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    blocks = mf.HeadBlocks(2)(x).numpy()
    assert blocks.shape == (2, 6, 8)
    np.testing.assert_array_equal(blocks[:, :3, :4], x[:, :, :4])
    np.testing.assert_array_equal(blocks[:, :3, 4:], 0)
    np.testing.assert_array_equal(blocks[:, 3:, 4:], x[:, :, 4:])
    np.testing.assert_array_equal(blocks[:, 3:, :4], 0)
    np.testing.assert_array_equal(mf.HeadDiagonal(2)(blocks).numpy(), x)


def test_xnnpack_friendly_int8_runs_in_one_partition(tmp_path, rng):
    """The bridges feed feature maps straight into BATCH_MATMULs; making those inputs symmetric
    must carry through the PADs of the next strided depthwise conv, or XNNPACK refuses the file."""
    from compress.tflite.audit import audit_tflite
    from compress.tflite.convert import export_tflite
    from compress.tflite.fast_int8 import slow_int8_layers
    from compress.tflite.flatbuffer import TFLiteFile

    keras.backend.clear_session()
    model = mf.build_mobile_former(num_classes=4, input_size=64, groups=1, **TINY)
    randomize(model, rng)
    path = tmp_path / "mf.int8.tflite"
    meta = export_tflite(model, path, fmt="int8", input_size=64,
                         representative=rng.random((8, 64, 64, 3)).astype("float32"))
    audit = audit_tflite(str(path))
    assert audit["runnable"]["xnnpack"], audit.get("errors")
    assert meta["bmm_rhs_symmetric"] > 0 and "bmm_edit_refused" not in meta
    assert audit["partitions"] == 1 and audit["undelegated_ops"] == {}
    # kept float on purpose: the (stride-2) depthwise convs with a channel multiplier, the only
    # float heavy ops, and the dynamic ReLUs, whose products are float MULs
    slow = slow_int8_layers(model)
    dw = {n for n, why in slow.items() if "depth_multiplier" in why}
    dyn = {n for n, why in slow.items() if "dynamic ReLU" in why}
    assert dw and dyn and dw | dyn == set(slow)
    assert meta["slow_int8_float_layers"] == len(slow) and audit["float_heavy_ops"] == len(dw)
    f = TFLiteFile(str(path))
    muls = {f.tensors[op.outputs[0]].dtype for op in f.ops if op.type == "MUL"
            and any(f"/{n}/" in f.tensors[op.outputs[0]].name for n in dyn)}
    assert muls == {"FLOAT32"}
    # the Former->Mobile softmax over the tokens: explicit ops, all float, no row-wise SOFTMAX
    sm = {(op.type, f.tensors[op.outputs[0]].dtype) for op in f.ops
          if "_g2l_softmax/" in f.tensors[op.outputs[0]].name}
    assert {t for t, _ in sm} == {"REDUCE_MAX", "SUB", "EXP", "SUM", "DIV"}, sm
    assert {d for _, d in sm} == {"FLOAT32"}


def test_axis_softmax_and_transposed_matmul(rng):
    """The Former->Mobile attention's pieces: a softmax over a non-last axis written as its ops,
    and attnᵀ·v."""
    from models.layers import AxisSoftmax, MatMul

    x = (5 * rng.standard_normal((2, 3, 6, 40))).astype("float32")
    for axis in (-2, 1, -1):
        np.testing.assert_allclose(AxisSoftmax(axis)(x).numpy(), softmax(x, axis), rtol=1e-5,
                                   atol=1e-7)
    a, b = rng.standard_normal((2, 3, 6, 40)), rng.standard_normal((2, 3, 6, 5))
    got = MatMul(transpose_a=True)([a.astype("float32"), b.astype("float32")]).numpy()
    np.testing.assert_allclose(got, a.transpose(0, 1, 3, 2) @ b, rtol=1e-5, atol=1e-5)
    layer = MatMul.from_config(MatMul(transpose_a=True, name="m").get_config())
    assert layer.transpose_a and not layer.transpose_b
