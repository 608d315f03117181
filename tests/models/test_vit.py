"""ViT teachers: a fixed input size and the Google `.npz` loader, checked against a NumPy
forward pass written from the Flax checkpoint layout (not from our Keras code). (Forward at two
sizes, gradients, round trips and TFLite of every registered model: test_all_models.py.)"""

import math

import numpy as np
import pytest

import models
from models.vit import build_vit, load_google_npz

TINY = dict(dim=32, depth=2, heads=2, mlp_dim=64)


def test_fixed_input_size():
    model = models.create_model("vit_tiny_patch16", num_classes=7, input_size=160)
    assert model.input_shape == (None, 160, 160, 3) and model.output_shape == (None, 7)


def write_flax_checkpoint(path, rng, *, dim, depth, heads, mlp_dim, num_classes, grid=14,
                          big_vision=False):
    """A random checkpoint with the key names and shapes of google-research/vision_transformer."""
    hd = dim // heads
    r = lambda *s: rng.normal(0, 0.2, s).astype("float32")  # noqa: E731
    w = {"embedding/kernel": r(16, 16, 3, dim), "embedding/bias": r(dim), "cls": r(1, 1, dim),
         "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, dim),
         "Transformer/encoder_norm/scale": 1 + r(dim), "Transformer/encoder_norm/bias": r(dim),
         "head/kernel": r(dim, num_classes), "head/bias": r(num_classes)}
    mha, mlp, ln2 = (("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision
                     else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2"))
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", ln2):
            w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = 1 + r(dim), r(dim)
        for part in ("query", "key", "value"):
            w[f"{b}{mha}/{part}/kernel"], w[f"{b}{mha}/{part}/bias"] = r(dim, heads, hd), r(heads, hd)
        w[f"{b}{mha}/out/kernel"], w[f"{b}{mha}/out/bias"] = r(heads, hd, dim), r(dim)
        w[f"{b}{mlp}/Dense_0/kernel"], w[f"{b}{mlp}/Dense_0/bias"] = r(dim, mlp_dim), r(mlp_dim)
        w[f"{b}{mlp}/Dense_1/kernel"], w[f"{b}{mlp}/Dense_1/bias"] = r(mlp_dim, dim), r(dim)
    np.savez(path, **w)
    return w


def numpy_vit(w, img, *, depth, heads, big_vision=False):
    """Reference forward pass straight from the Flax parameters (eps 1e-6, exact GELU)."""
    erf = np.vectorize(math.erf)

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * w[p + "/scale"] + w[p + "/bias"]

    mha, mlp, ln2 = (("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision
                     else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2"))
    b_, h_, w_, _ = img.shape
    k = w["embedding/kernel"]
    patches = img.reshape(b_, h_ // 16, 16, w_ // 16, 16, 3).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("bijpqc,pqcd->bijd", patches, k) + w["embedding/bias"]
    x = x.reshape(b_, -1, k.shape[-1])
    x = np.concatenate([np.repeat(w["cls"], b_, 0), x], 1) + w["Transformer/posembed_input/pos_embedding"]
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        y = ln(x, b + "LayerNorm_0")
        q, kk, v = (np.einsum("bnd,dhk->bhnk", y, w[f"{b}{mha}/{p}/kernel"])
                    + w[f"{b}{mha}/{p}/bias"][None, :, None] for p in ("query", "key", "value"))
        a = np.einsum("bhnk,bhmk->bhnm", q, kk) / np.sqrt(q.shape[-1])
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhnm,bhmk->bhnk", a, v)
        x = x + np.einsum("bhnk,hkd->bnd", o, w[f"{b}{mha}/out/kernel"]) + w[f"{b}{mha}/out/bias"]
        y = ln(x, b + ln2) @ w[f"{b}{mlp}/Dense_0/kernel"] + w[f"{b}{mlp}/Dense_0/bias"]
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
        x = x + y @ w[f"{b}{mlp}/Dense_1/kernel"] + w[f"{b}{mlp}/Dense_1/bias"]
    x = ln(x, "Transformer/encoder_norm")[:, 0]
    return x @ w["head/kernel"] + w["head/bias"]


@pytest.mark.parametrize("big_vision", [False, True])
def test_google_npz_matches_numpy_reference(tmp_path, rng, big_vision):
    path = tmp_path / "vit.npz"
    w = write_flax_checkpoint(path, rng, num_classes=5, big_vision=big_vision, **TINY)
    model = build_vit(num_classes=5, **TINY)
    summary = load_google_npz(model, str(path))
    assert summary["head_loaded"] and len(summary["loaded"]) == len(w)
    img = rng.random((2, 224, 224, 3)).astype("float32")
    ref = numpy_vit({k: v.astype("float64") for k, v in w.items()}, img.astype("float64"),
                    depth=TINY["depth"], heads=TINY["heads"], big_vision=big_vision)
    np.testing.assert_allclose(model(img).numpy(), ref, atol=2e-4, rtol=1e-4)


def test_npz_with_other_classes_keeps_new_head_and_resamples_grid(tmp_path, rng):
    path = tmp_path / "vit384.npz"
    write_flax_checkpoint(path, rng, num_classes=1000, grid=24, **TINY)  # a 384-px fine-tune
    model = build_vit(num_classes=10, **TINY)
    head_before = model.get_layer("head").get_weights()[0].copy()
    summary = load_google_npz(model, str(path))
    assert not summary["head_loaded"]
    np.testing.assert_array_equal(model.get_layer("head").get_weights()[0], head_before)
    assert model.get_layer("pos_embed").get_weights()[1].shape == (1, 197, TINY["dim"])
    assert np.isfinite(model(np.zeros((1, 224, 224, 3), "float32")).numpy()).all()


def test_full_size_tiny_checkpoint_loads_into_registry_model(tmp_path, rng):
    path = tmp_path / "ti.npz"
    write_flax_checkpoint(path, rng, dim=192, depth=12, heads=3, mlp_dim=768, num_classes=1000)
    model = models.create_model("vit_tiny_patch16")
    assert load_google_npz(model, str(path))["head_loaded"]


def test_bad_checkpoint_gets_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read ViT checkpoint"):
        load_google_npz(build_vit(num_classes=2, **TINY), str(bad))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a Google ViT checkpoint"):
        load_google_npz(build_vit(num_classes=2, **TINY), str(tmp_path / "other.npz"))
