"""MobileViT v1: shapes at several sizes, unfold/fold against timm's layout, logits parity with
timm (random weights, real images), TFLite fp32/int8 conversion with builtin ops only.
(Gradients through the resize path, clone and config round trips: test_all_models.py.)"""

import numpy as np
import pytest

import models
from models.compat import keras
from models.layers import CUSTOM_OBJECTS
from models.mobilevit import Fold, Unfold, convert_timm_state_dict
from tests.helpers import import_torch_timm, load_images, run_tflite

PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def xxs_dynamic():
    keras.backend.clear_session()
    return models.create_model("mobilevit_xxs", num_classes=10)


@pytest.mark.parametrize("size", [160, 192, 256])
def test_forward_any_multiple_of_32(xxs_dynamic, size):
    assert xxs_dynamic.input_shape == (None, None, None, 3)
    out = xxs_dynamic(np.random.default_rng(size).random((1, size, size, 3), "float32"))
    assert out.shape == (1, 10) and np.isfinite(out.numpy()).all()


def test_fixed_input_size_and_overrides():
    model = models.create_model("mobilevit_xxs", num_classes=7, input_size=160, dropout=0.1)
    assert model.input_shape == (None, 160, 160, 3) and model.output_shape == (None, 7)
    assert model.get_layer("head_drop").rate == 0.1


@pytest.mark.parametrize("name", models.list_models(family="mobilevit"))
def test_only_stock_layers_and_small_custom_ones(name):
    keras.backend.clear_session()
    model = models.create_model(name, input_size=256)
    kinds = {type(l).__name__ for l in model.layers}
    assert not kinds & {"TFOpLambda", "Lambda", "MultiHeadAttention", "SlicingOpLambda"}
    custom = {k for k in kinds if k in CUSTOM_OBJECTS}
    assert custom == {"Unfold", "Fold", "MatMul", "Scale"}
    for layer in model.layers:
        if type(layer).__name__ in custom:
            assert layer.get_prunable_weights() == [] and not layer.weights


# ------------------------------------------------------------------------------------------
# Unfold / fold


def timm_unfold(x_nhwc, patch=2):
    """timm `MobileVitBlock.forward` unfold, on an NCHW copy with NumPy (sizes multiple of 2)."""
    x = x_nhwc.transpose(0, 3, 1, 2)
    b, c, h, w = x.shape
    nh, nw = h // patch, w // patch
    x = x.reshape(b * c * nh, patch, nw, patch).transpose(0, 2, 1, 3)
    x = x.reshape(b, c, nh * nw, patch * patch).transpose(0, 3, 2, 1)
    return x.reshape(b * patch * patch, nh * nw, c)


def _apply(layer_fn, x, dynamic):
    """Run through a functional model with a static or (None, None) input."""
    shape = (None, None, x.shape[-1]) if dynamic else x.shape[1:]
    inp = keras.Input(shape)
    return keras.Model(inp, layer_fn(inp))(x).numpy()


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 4, 3), (2, 6, 10, 5), (2, 10, 14, 8), (3, 2, 18, 4)])
def test_unfold_matches_timm_and_fold_inverts_it_exactly(rng, shape, dynamic):
    x = rng.standard_normal(shape).astype("float32")
    tokens = _apply(lambda t: Unfold(2)(t), x, dynamic)
    np.testing.assert_array_equal(tokens, timm_unfold(x))
    back = _apply(lambda t: Fold(2)([Unfold(2)(t), t]), x, dynamic)
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("shape", [(1, 5, 5, 3), (2, 9, 9, 4), (1, 7, 10, 2)])
def test_odd_maps_are_resized_like_torch(rng, shape, dynamic):
    """Non-multiple sizes: bilinear (align_corners=False) up before unfold, back after fold."""
    torch, _ = import_torch_timm()
    F = torch.nn.functional
    x = rng.standard_normal(shape).astype("float32")
    h, w = shape[1:3]
    hp, wp = -(-h // 2) * 2, -(-w // 2) * 2
    up = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(hp, wp), mode="bilinear",
                       align_corners=False)
    down = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
    up, down = (t.permute(0, 2, 3, 1).numpy() for t in (up, down))
    tokens = _apply(lambda t: Unfold(2)(t), x, dynamic)
    np.testing.assert_allclose(tokens, timm_unfold(up), atol=1e-6)
    back = _apply(lambda t: Fold(2)([Unfold(2)(t), t]), x, dynamic)
    assert back.shape == x.shape
    np.testing.assert_allclose(back, down, atol=1e-6)
    # Folding alone (no resize) inverts the rearrangement exactly.
    np.testing.assert_array_equal(
        _apply(lambda t: Fold(2)([Unfold(2)(t), t]), up, dynamic), up)


# ------------------------------------------------------------------------------------------
# Parity with timm


def random_timm_model(name, seed=0):
    """timm model in eval mode with every norm, BN statistic and Linear randomised, so that no
    BN is an identity and attention is far from uniform (timm's init makes it near-uniform)."""
    torch, timm = import_torch_timm()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            if isinstance(mod, torch.nn.Linear):
                fan_in = mod.weight.shape[1]
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / fan_in**0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, state


def check_parity(name, sizes, imagenette_dir, input_size=None):
    torch, _ = import_torch_timm()
    timm_model, state = random_timm_model(name)
    keras.backend.clear_session()
    model = models.create_model(name, input_size=input_size)
    summary = convert_timm_state_dict(model, state)
    assert len(summary["loaded"]) + len(summary["ignored"]) == len(state)
    diffs = {}
    for size in sizes:
        imgs = load_images(imagenette_dir, 4, size)
        ours = model(imgs, training=False).numpy()
        with torch.no_grad():
            ref = timm_model(torch.from_numpy(imgs).permute(0, 3, 1, 2)).numpy()
        # the check means something only if the logits vary far more than the tolerance
        assert np.abs(ref - ref.mean(0)).max() > 100 * PARITY_ATOL
        diffs[size] = float(np.abs(ours - ref).max())
    print(f"{name} max |keras - timm|: {diffs}")
    assert max(diffs.values()) <= PARITY_ATOL, diffs


def test_parity_xxs_with_timm(imagenette_dir):
    """256: exact patch grids; 160: 5x5 map at stage 5 (resize path)."""
    check_parity("mobilevit_xxs", [256, 160], imagenette_dir)


@pytest.mark.slow
def test_parity_xxs_fixed_288(imagenette_dir):
    check_parity("mobilevit_xxs", [288], imagenette_dir, input_size=288)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in models.list_models(family="mobilevit")
                                  if n != "mobilevit_xxs"])
def test_parity_xs_s_with_timm(name, imagenette_dir):
    check_parity(name, [256, 288], imagenette_dir)


def test_converter_rejects_bad_state_dicts():
    keras.backend.clear_session()
    model = models.create_model("mobilevit_xxs", input_size=256)
    _, state = random_timm_model("mobilevit_xxs")
    before = model.get_layer("stem_conv").get_weights()[0].copy()

    missing = {k: v for k, v in state.items() if k != "stages.2.1.transformer.0.attn.qkv.bias"}
    with pytest.raises(ValueError,
                       match=r"1 missing key\(s\): stages\.2\.1\.transformer\.0\.attn\.qkv\.bias"):
        convert_timm_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): extra\.weight$"):
        convert_timm_state_dict(model, {**state, "extra.weight": np.zeros(3)})
    bad = {**state, "final_conv.conv.weight": np.zeros((321, 80, 1, 1), "float32")}
    with pytest.raises(ValueError, match=r"1 shape mismatch\(es\): final_conv"):
        convert_timm_state_dict(model, bad)
    # nothing is written when the state dict does not fit
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0], before)

    # a 1000-class checkpoint into a 10-class model: only with include_head=False
    small = models.create_model("mobilevit_xxs", num_classes=10, input_size=256)
    with pytest.raises(ValueError, match="head"):
        convert_timm_state_dict(small, state)
    summary = convert_timm_state_dict(small, state, include_head=False)
    assert "head.fc.weight" in summary["ignored"]
    np.testing.assert_array_equal(small.get_layer("stem_conv").get_weights()[0],
                                  state["stem.conv.weight"].transpose(2, 3, 1, 0))


# ------------------------------------------------------------------------------------------
# TFLite


def tflite_ops(content):
    from ai_edge_litert.interpreter import Interpreter

    return {op["op_name"] for op in Interpreter(model_content=content)._get_ops_details()}


def assert_builtin_only(ops):
    assert not {o for o in ops if o.startswith("Flex") or o == "CUSTOM" or "custom" in o.lower()}
    assert "SPLIT_V" not in ops


def test_tflite_fp32_and_int8_builtin_only(imagenette_dir, tmp_path):
    """Through the project's `export_tflite` (test_all_models.py checks fp32 parity of every
    model at a small size; here the deployed 256 px graph and the plain full-integer file)."""
    from compress.tflite.convert import export_tflite

    keras.backend.clear_session()
    model = models.create_model("mobilevit_xxs", num_classes=10, input_size=256)
    imgs = load_images(imagenette_dir, 4, 256)

    export_tflite(model, tmp_path / "fp32.tflite", fmt="fp32", input_size=256)
    fp32 = (tmp_path / "fp32.tflite").read_bytes()
    ops = tflite_ops(fp32)
    assert_builtin_only(ops)
    assert "RESIZE_BILINEAR" not in ops and "CONV_2D" in ops and "BATCH_MATMUL" in ops
    diff = float(np.abs(run_tflite(fp32, imgs) - model(imgs).numpy()).max())
    print(f"fp32 tflite max |tflite - keras| = {diff:.3g}")
    assert diff <= 1e-4

    # the converter's plain full-integer file (TFLITE_BUILTINS_INT8: no float fallback)
    export_tflite(model, tmp_path / "int8.tflite", fmt="int8", input_size=256, representative=imgs,
                  xnnpack_friendly=False, strict_int8=True)
    int8 = (tmp_path / "int8.tflite").read_bytes()
    assert_builtin_only(tflite_ops(int8))
    out = run_tflite(int8, imgs)
    assert out.shape == (4, 10) and np.isfinite(out).all()
    assert len(int8) < 0.4 * len(fp32)
