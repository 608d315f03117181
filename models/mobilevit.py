"""MobileViT v1 (XXS, XS, S) students, arXiv:2110.02178 ("MobileViT: Light-weight,
General-purpose, and Mobile-friendly Vision Transformer", Mehta & Rastegari, ICLR 2022).

An exact Keras port of timm's `mobilevit_xxs` / `mobilevit_xs` / `mobilevit_s` (configs from
apple/ml-cvnets, identical in timm): stem 3x3/2 conv, MobileNetV2 inverted residuals, and three
MobileViT blocks (local 3x3 conv + 1x1 projection, unfold into 2x2 patches, pre-norm transformer
layers with SiLU MLPs, fold, 1x1 projection, fusion 3x3 conv on [block input, projection]),
then a 1x1 head conv, global average pooling and a linear classifier. Input: RGB in [0, 1]
(timm mean 0, std 1). Trainable parameters equal timm's counts at 1000 classes.

Any input size that is a multiple of 32 works. Where a MobileViT block's feature map has an odd
side (e.g. 5x5 / 9x9 at the last stage for 160 / 288 px inputs) the map is bilinearly resized up
to the next multiple of the patch size before unfolding and back after folding
(align_corners=False, as ml-cvnets and timm do).

Differences from the reference:
  * the fused qkv Linear is three Dense layers (`models.layers.multi_head_attention`; the weights
    are split by `convert_timm_state_dict`), so TFLite graphs have no SPLIT_V;
  * the unfold/fold rearrangement is two weightless custom layers (`Unfold`, `Fold`) built from
    reshapes and rank-4 transposes; the sequences (one per pixel position inside the 2x2 patch)
    and the token order inside them are those of timm;
  * strided convs use explicit ZeroPadding2D(1) + 'valid' (PyTorch's symmetric padding);
  * no stochastic depth; optional classifier dropout (`dropout`, default 0 as timm).
"""

from __future__ import annotations

import re

import numpy as np

from models.compat import keras, tf
from models.layers import CUSTOM_OBJECTS, multi_head_attention
from models import qat
from models.registry import Family, register_model, resolve_widths
from models.timm_convert import few, key_problems

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
LN_EPS = 1e-5
PATCH = 2
HEADS = 4
MLP_RATIO = 2

# MV2 expansion; (channels, blocks, first stride) of the two inverted-residual stages;
# (channels, transformer dim, depth) of the three MobileViT stages (each opens with a stride-2
# inverted residual); head conv width. timm `model_cfgs` / ml-cvnets `config/mobilevit.py`.
_CFGS = {
    "xxs": dict(expansion=2, stem=16, ir=((16, 1, 1), (24, 3, 2)),
                mvit=((48, 64, 2), (64, 80, 4), (80, 96, 3)), head=320),
    "xs": dict(expansion=4, stem=16, ir=((32, 1, 1), (48, 3, 2)),
               mvit=((64, 96, 2), (80, 120, 4), (96, 144, 3)), head=384),
    "s": dict(expansion=4, stem=16, ir=((32, 1, 1), (64, 3, 2)),
              mvit=((96, 144, 2), (128, 192, 4), (160, 240, 3)), head=640),
}


# --------------------------------------------------------------------------------------------
# Unfold / fold


def _dim(x, axis):
    """Static size of `axis` if known, else a scalar tensor."""
    return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


def _ceil_to(n, multiple):
    return -(-n // multiple) * multiple  # works for ints and int tensors


def _needs_resize(h, w, hp, wp):
    """Python bool when the sizes are static, else a bool tensor."""
    if isinstance(h, int) and isinstance(w, int):
        return h != hp or w != wp
    return tf.logical_or(tf.not_equal(h, hp), tf.not_equal(w, wp))


def _resize(x, size):
    return tf.cast(tf.image.resize(x, size, method="bilinear"), x.dtype)


def _resize_if_needed(x, size, needed):
    """Resize when `needed` (a Python bool for static shapes, a bool tensor otherwise)."""
    if isinstance(needed, bool):
        return _resize(x, size) if needed else x
    return tf.cond(needed, lambda: _resize(x, size), lambda: tf.identity(x))


class Unfold(keras.layers.Layer):
    """Weightless: feature map [B, H, W, C] -> patch sequences [B*P, N, C] (MobileViT unfold).

    P = patch*patch pixel positions inside a patch, N = (H/patch)(W/patch) patches in row-major
    order; sequence b*P + p holds pixel p of every patch of image b (timm's layout). A side that
    is not a multiple of the patch size is first resized up (bilinear, align_corners=False).
    Only reshapes and rank-4 transposes.
    """

    def __init__(self, patch: int = PATCH, **kwargs):
        super().__init__(**kwargs)
        self.patch = int(patch)

    def call(self, x):
        p, c = self.patch, x.shape[-1]
        h, w = _dim(x, 1), _dim(x, 2)
        hp, wp = _ceil_to(h, p), _ceil_to(w, p)
        x = _resize_if_needed(x, (hp, wp), _needs_resize(h, w, hp, wp))
        nh, nw = hp // p, wp // p
        x = tf.reshape(x, (-1, p, nw, p * c))  # [B*nh, i, nw, (j, C)]
        x = tf.transpose(x, (0, 2, 1, 3))  # [B*nh, nw, i, (j, C)]
        x = tf.reshape(x, (-1, nh * nw, p * p, c))  # [B, N, P, C]
        x = tf.transpose(x, (0, 2, 1, 3))  # [B, P, N, C]
        return tf.reshape(x, (-1, nh * nw, c))  # [B*P, N, C]

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "patch": self.patch}


class Fold(keras.layers.Layer):
    """Weightless inverse of `Unfold`: inputs [tokens [B*P, N, C], the map that was unfolded
    [B, H, W, C'] (used for its shape only)] -> [B, H, W, C]. Resizes back to H x W when
    `Unfold` had to resize."""

    def __init__(self, patch: int = PATCH, **kwargs):
        super().__init__(**kwargs)
        self.patch = int(patch)

    def call(self, inputs):
        x, ref = inputs
        p, c = self.patch, x.shape[-1]
        h, w = _dim(ref, 1), _dim(ref, 2)
        hp, wp = _ceil_to(h, p), _ceil_to(w, p)
        nh, nw = hp // p, wp // p
        x = tf.reshape(x, (-1, p * p, nh * nw, c))  # [B, P, N, C]
        x = tf.transpose(x, (0, 2, 1, 3))  # [B, N, P, C]
        x = tf.reshape(x, (-1, nw, p, p * c))  # [B*nh, nw, i, (j, C)]
        x = tf.transpose(x, (0, 2, 1, 3))  # [B*nh, i, nw, (j, C)]
        x = tf.reshape(x, (-1, hp, wp, c))  # [B, H', W', C]
        return _resize_if_needed(x, (h, w), _needs_resize(h, w, hp, wp))

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "patch": self.patch}


CUSTOM_OBJECTS.update({"Unfold": Unfold, "Fold": Fold})

FAMILY = Family(
    "mobilevit",
    structured_pruning=True,
    timm_names={n: n for n in ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")},
    quantize={"Unfold": qat.noop("patch unfolding: moves values"),
              "Fold": qat.noop("patch folding: moves values")},
)


# --------------------------------------------------------------------------------------------
# Blocks


def _make_divisible(v, divisor=8):
    """timm `make_divisible` (round half up to the divisor, never below 90 %)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _bn(x, name):
    return keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=name)(x)


def _act(x, name):
    return keras.layers.Activation("swish", name=name)(x)


def conv_bn_act(x, filters, kernel, *, name, stride=1, act=True):
    """Bias-free Conv2D + BN (+ SiLU); symmetric PyTorch padding."""
    if stride > 1 and kernel > 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                            name=f"{name}_conv")(x)
    x = _bn(x, f"{name}_bn")
    return _act(x, f"{name}_act") if act else x


def inverted_residual(x, filters, *, stride, expansion, name, mid=None):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (stride), linear 1x1 project, residual.

    `mid`: expansion (hidden) channels; None is the reference's `in_ch * expansion`, rounded.
    """
    in_ch = x.shape[-1]
    mid = mid or _make_divisible(in_ch * expansion)
    y = conv_bn_act(x, mid, 1, name=f"{name}_expand")
    if stride > 1:
        y = keras.layers.ZeroPadding2D(1, name=f"{name}_dw_pad")(y)
    y = keras.layers.DepthwiseConv2D(3, strides=stride, padding="valid" if stride > 1 else "same",
                                     use_bias=False, name=f"{name}_dw_conv")(y)
    y = _act(_bn(y, f"{name}_dw_bn"), f"{name}_dw_act")
    y = conv_bn_act(y, filters, 1, name=f"{name}_project", act=False)
    if stride == 1 and in_ch == filters:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilevit_block(x, *, dim, depth, name, dropout=0.0, heads=None, mlp=None):
    """Local 3x3 conv + 1x1 -> unfold -> `depth` transformer layers -> LN -> fold -> 1x1 ->
    3x3 fusion conv on [block input, projection].

    `heads`, `mlp`: per transformer layer, the attention heads (of dim/HEADS channels each) and
    MLP hidden units; None is the reference's HEADS and dim * MLP_RATIO in every layer.
    """
    channels = x.shape[-1]
    head_dim = dim // HEADS
    heads = heads or [HEADS] * depth
    mlp = mlp or [dim * MLP_RATIO] * depth
    y = conv_bn_act(x, channels, 3, name=f"{name}_local")
    y = keras.layers.Conv2D(dim, 1, use_bias=False, name=f"{name}_local_1x1")(y)
    t = Unfold(PATCH, name=f"{name}_unfold")(y)
    for i in range(depth):
        p = f"{name}_tr{i}"
        u = keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{p}_ln1")(t)
        u = multi_head_attention(u, dim=heads[i] * head_dim, heads=heads[i], out_dim=dim,
                                 name=f"{p}_attn")
        if dropout:
            u = keras.layers.Dropout(dropout, name=f"{p}_attn_drop")(u)
        t = keras.layers.Add(name=f"{p}_add1")([t, u])
        u = keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{p}_ln2")(t)
        u = keras.layers.Dense(mlp[i], name=f"{p}_mlp_fc1")(u)
        u = _act(u, f"{p}_mlp_act")
        u = keras.layers.Dense(dim, name=f"{p}_mlp_fc2")(u)
        if dropout:
            u = keras.layers.Dropout(dropout, name=f"{p}_mlp_drop")(u)
        t = keras.layers.Add(name=f"{p}_add2")([t, u])
    t = keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{name}_norm")(t)
    y = Fold(PATCH, name=f"{name}_fold")([t, y])
    y = conv_bn_act(y, channels, 1, name=f"{name}_proj")
    y = keras.layers.Concatenate(axis=-1, name=f"{name}_concat")([x, y])
    return conv_bn_act(y, channels, 3, name=f"{name}_fusion")


def default_widths(*, expansion: int, stem: int, ir, mvit, **_) -> dict:
    """The reference's widths in the `widths=` format of `build_mobilevit`: `expand` (hidden
    channels of every inverted residual, in build order), `heads` and `mlp` (every transformer
    layer, in build order)."""
    expand, heads, mlp, channels = [], [], [], stem
    for filters, blocks, _ in ir:
        for _ in range(blocks):
            expand.append(_make_divisible(channels * expansion))
            channels = filters
    for filters, dim, depth in mvit:
        expand.append(_make_divisible(channels * expansion))
        channels = filters
        heads += [HEADS] * depth
        mlp += [dim * MLP_RATIO] * depth
    return dict(expand=expand, heads=heads, mlp=mlp)


def build_mobilevit(
    *,
    expansion: int,
    stem: int,
    ir,
    mvit,
    head: int,
    num_classes: int = 1000,
    input_size: int | None = None,
    dropout: float = 0.0,
    transformer_dropout: float = 0.0,
    widths: dict | None = None,
    name: str = "mobilevit",
) -> keras.Model:
    """A MobileViT v1 classifier (see the module docstring); returns logits.

    Args:
      dropout: classifier dropout (ml-cvnets ImageNet recipe: 0.1; timm default 0).
      transformer_dropout: dropout after attention and MLP in the transformer layers
        (ml-cvnets recipe: 0.1; timm default 0).
      widths: a thinner model of the same layout and layer names (structured pruning,
        `compress/structured.py`): a dict of lists as `default_widths` returns, any key left
        out keeping the reference's widths. None builds the reference model.
    """
    w = resolve_widths(widths, default_widths(expansion=expansion, stem=stem, ir=ir, mvit=mvit),
                       name)
    expand, heads, mlp = iter(w["expand"]), w["heads"], w["mlp"]
    shape = (input_size, input_size, 3) if input_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    x = conv_bn_act(inputs, stem, 3, stride=2, name="stem")
    stage = 1
    for filters, blocks, stride in ir:
        for j in range(blocks):
            x = inverted_residual(x, filters, stride=stride if j == 0 else 1, expansion=expansion,
                                  name=f"stage{stage}_block{j}", mid=next(expand))
        stage += 1
    layer = 0
    for filters, dim, depth in mvit:
        x = inverted_residual(x, filters, stride=2, expansion=expansion,
                              name=f"stage{stage}_block0", mid=next(expand))
        x = mobilevit_block(x, dim=dim, depth=depth, name=f"stage{stage}_block1",
                            dropout=transformer_dropout, heads=heads[layer:layer + depth],
                            mlp=mlp[layer:layer + depth])
        layer += depth
        stage += 1
    x = conv_bn_act(x, head, 1, name="final")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_drop")(x)
    x = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, x, name=name)


def _builder(variant):
    def build(*, num_classes=1000, input_size=None, **overrides):
        return build_mobilevit(num_classes=num_classes, input_size=input_size,
                               name=f"mobilevit_{variant}", **{**_CFGS[variant], **overrides})
    return build


@register_model(params=1_272_024, default_size=256, size_divisor=32, family="mobilevit")
def mobilevit_xxs(*, num_classes=1000, input_size=None, **overrides):
    return _builder("xxs")(num_classes=num_classes, input_size=input_size, **overrides)


@register_model(params=2_317_848, default_size=256, size_divisor=32, family="mobilevit")
def mobilevit_xs(*, num_classes=1000, input_size=None, **overrides):
    return _builder("xs")(num_classes=num_classes, input_size=input_size, **overrides)


@register_model(params=5_578_632, default_size=256, size_divisor=32, family="mobilevit")
def mobilevit_s(*, num_classes=1000, input_size=None, **overrides):
    return _builder("s")(num_classes=num_classes, input_size=input_size, **overrides)


# --------------------------------------------------------------------------------------------
# timm weights


_IR_PARTS = {"expand": "conv1_1x1", "dw": "conv2_kxk", "project": "conv3_1x1"}
_MVIT_PARTS = {"local": "conv_kxk", "proj": "conv_proj", "fusion": "conv_fusion"}


def _timm_prefix(layer_name: str) -> tuple[str, str] | None:
    """Our layer name -> (timm module prefix, kind) or None for weightless layers.

    kind: conv | dwconv | bn | ln | dense | q | k | v.
    """
    n = layer_name
    if m := re.fullmatch(r"(stem|final)_(conv|bn)", n):
        top = "stem" if m[1] == "stem" else "final_conv"
        return f"{top}.{m[2]}", m[2]
    if n == "head":
        return "head.fc", "dense"
    m = re.fullmatch(r"stage(\d)_block(\d+)_(.+)", n)
    if not m:
        return None
    base, rest = f"stages.{int(m[1]) - 1}.{m[2]}", m[3]
    if m2 := re.fullmatch(r"(expand|dw|project)_(conv|bn)", rest):
        kind = "dwconv" if rest == "dw_conv" else m2[2]
        return f"{base}.{_IR_PARTS[m2[1]]}.{m2[2]}", kind
    if m2 := re.fullmatch(r"(local|proj|fusion)_(conv|bn)", rest):
        return f"{base}.{_MVIT_PARTS[m2[1]]}.{m2[2]}", m2[2]
    if rest == "local_1x1":
        return f"{base}.conv_1x1", "conv"
    if rest == "norm":
        return f"{base}.norm", "ln"
    if m2 := re.fullmatch(r"tr(\d+)_(ln1|ln2|attn_q|attn_k|attn_v|attn_proj|mlp_fc1|mlp_fc2)",
                          rest):
        t = f"{base}.transformer.{m2[1]}"
        part = m2[2]
        if part in ("ln1", "ln2"):
            return f"{t}.norm{part[-1]}", "ln"
        if part in ("attn_q", "attn_k", "attn_v"):
            return f"{t}.attn.qkv", part[-1]
        if part == "attn_proj":
            return f"{t}.attn.proj", "dense"
        return f"{t}.mlp.{part[4:]}", "dense"
    return None


def convert_timm_state_dict(model: keras.Model, state_dict, *, include_head: bool = True) -> dict:
    """Fill every weight of a MobileViT model built here from a timm `mobilevit_*` state dict.

    Args:
      model: from `create_model("mobilevit_xxs" | "mobilevit_xs" | "mobilevit_s", ...)`.
      state_dict: timm parameter and buffer names -> NumPy arrays (e.g.
        `{k: v.numpy() for k, v in timm_model.state_dict().items()}`); BN running statistics
        are loaded, `num_batches_tracked` is ignored.
      include_head: also load `head.fc.*`; False keeps the model's own classifier (fine-tuning
        to another class count) and ignores those keys.
    Returns: a summary dict: `loaded` (sorted timm keys used), `ignored` (keys left out on
      purpose).
    Raises: ValueError (one line) naming missing keys, unexpected keys and shape mismatches;
      nothing is loaded then.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    used, mismatched = set(), []
    ignored = {k for k in sd if k.endswith("num_batches_tracked")}
    if not include_head:
        ignored |= {k for k in sd if k.startswith("head.fc.")}

    def get(key):
        used.add(key)
        return sd.get(key)

    assignments = []  # (layer, [arrays])
    for layer in model.layers:
        if not layer.weights:
            continue
        found = _timm_prefix(layer.name)
        if found is None:
            raise ValueError(f"layer {layer.name!r} has weights but no timm counterpart")
        prefix, kind = found
        if kind == "dense" and layer.name == "head" and not include_head:
            continue
        if kind in ("conv", "dwconv"):
            w = get(f"{prefix}.weight")
            arrays = None if w is None else [
                w.transpose(2, 3, 0, 1) if kind == "dwconv" else w.transpose(2, 3, 1, 0)]
        elif kind == "bn":
            arrays = [get(f"{prefix}.{s}") for s in
                      ("weight", "bias", "running_mean", "running_var")]
        elif kind == "ln":
            arrays = [get(f"{prefix}.weight"), get(f"{prefix}.bias")]
        elif kind == "dense":
            w, b = get(f"{prefix}.weight"), get(f"{prefix}.bias")
            arrays = [None if w is None else w.T, b]
        else:  # q / k / v: rows [0:d], [d:2d], [2d:3d] of the fused qkv Linear
            w, b = get(f"{prefix}.weight"), get(f"{prefix}.bias")
            i = "qkv".index(kind)
            if w is not None and w.shape[0] % 3:
                mismatched.append(f"{prefix}.weight: {w.shape} is not a fused qkv weight")
                continue
            d = None if w is None else w.shape[0] // 3
            arrays = [None if w is None else w[i * d:(i + 1) * d].T,
                      None if b is None else b[i * d:(i + 1) * d]]
        if arrays is None or any(a is None for a in arrays):
            continue
        expected = [tuple(v.shape) for v in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            mismatched.append(f"{layer.name} <- {prefix}: model {expected}, checkpoint {got}")
            continue
        assignments.append((layer, arrays))

    problems = key_problems(sd, used, ignored=ignored)
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {few(mismatched, 2)}")
    if problems:
        raise ValueError(f"timm state dict does not fit {model.name!r}: " + "; ".join(problems))
    for layer, arrays in assignments:
        layer.set_weights([a.astype(np.float32) for a in arrays])
    return {"loaded": sorted(used), "ignored": sorted(ignored)}
