"""EfficientFormer v1 (L1, L3, L7), arXiv:2206.01191 ("EfficientFormer: Vision Transformers at
MobileNet Speed", Li et al., NeurIPS 2022), ported from timm's `efficientformer_l1/l3/l7`
(itself a re-layout of snap-research/EfficientFormer).

Structure (NHWC): a stride-4 conv stem; four stages of widths `widths` and depths `depths`
(stages 2-4 start with a strided conv + BN downsample); Meta4D blocks
(`x + ls1 * (avgpool3x3(x) - x)`, then `x + ls2 * convMLP(x)` with BN) everywhere except the
last `num_vit` blocks of the last stage, which are Meta3D blocks (pre-LN attention + pre-LN MLP)
on the flattened 7x7 tokens; a final LayerNorm, token mean, and two linear heads (class and
distillation) that are averaged at inference.

Parameter counts equal timm's at 1000 classes (12,289,928 / 31,406,000 / 82,229,328 trainable;
BN running statistics are non-trainable weights, as in timm's buffers).

Differences from timm:
  * timm's fused `qkv` Linear (head-interleaved `[q 32 | k 32 | v 128]` per head) is three
    Dense layers `*_attn_q/k/v` (heads-major q, k and v): the same parameters, re-indexed by
    `convert_timm_state_dict`; no SPLIT_V op in TFLite graphs. The 1/sqrt(key_dim) scale is
    applied to q before q.kT (timm scales the product; equal up to float rounding).
  * The attention-bias table is kept at its trained 7x7 shape `(heads, 49)`; for an input
    other than 224 px it is bilinearly resized (over the |drow|, |dcol| offset grid) to the
    (S/32)x(S/32) token grid inside `AttentionBias` (timm fixes the input at 224; kecam resizes
    the table the same way when loading). At 224 the resize is the identity.
  * Inputs are fixed-size (`input_size=None` means 224x224), since the bias is tied to the grid.
  * `with_distillation_head=True` returns `[class_logits, distill_logits]` in every mode (timm
    returns the pair only when `distilled_training` is set and the model is training).
  * No stochastic depth (timm's default `drop_path_rate=0` too).
  * Keras block indices count only Meta blocks: timm's `Flat` module takes a slot in
    `stages.3.blocks` (e.g. L1 `stages.3.blocks.4` is Keras `stage3_block3`); the converter
    maps between the two.
"""

from __future__ import annotations

import re

import numpy as np

from models.compat import keras, tf
from models.layers import CUSTOM_OBJECTS, LayerScale, MatMul, Scale, merge_heads, split_heads
from models import qat
from models.registry import Family, register_model, resolve_widths
from models.timm_convert import few, key_problems

WIDTHS = {"l1": (48, 96, 224, 448), "l3": (64, 128, 320, 512), "l7": (96, 192, 384, 768)}
DEPTHS = {"l1": (3, 2, 6, 4), "l3": (4, 4, 12, 6), "l7": (6, 6, 18, 8)}
NUM_VIT = {"l1": 1, "l3": 4, "l7": 8}

DEFAULT_SIZE = 224
BIAS_RESOLUTION = 7  # the attention-bias table is stored for a 7x7 token grid (224 px input)
HEADS, KEY_DIM, ATTN_RATIO = 8, 32, 4
MLP_RATIO = 4
BN_EPS, BN_MOMENTUM, LN_EPS = 1e-5, 0.9, 1e-5
LAYER_SCALE_INIT = 1e-5


def relative_position_index(grid: int) -> np.ndarray:
    """(grid^2, grid^2) index into a (heads, grid^2) table: |drow| * grid + |dcol| (timm)."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    pos = np.stack([rows.ravel(), cols.ravel()])  # [2, N]
    rel = np.abs(pos[:, :, None] - pos[:, None, :])  # [2, N, N]
    return (rel[0] * grid + rel[1]).astype(np.int32)


def resize_bias_table(table, grid: int):
    """(heads, r*r) table over (|drow|, |dcol|) offsets -> (heads, grid*grid), bilinear.

    Uses half-pixel centres (`tf.image.resize`), so `grid == r` returns the table unchanged.
    """
    heads, n = table.shape
    r = int(round(n**0.5))
    img = tf.transpose(tf.reshape(table, (heads, r, r)), (1, 2, 0))[None]  # [1, r, r, heads]
    img = tf.image.resize(img, (grid, grid), method="bilinear")
    return tf.reshape(tf.transpose(img[0], (2, 0, 1)), (heads, grid * grid))


class AttentionBias(keras.layers.Layer):
    """Adds the learned relative-position attention bias to attention logits [B, heads, N, N].

    Holds the `(heads, resolution^2)` table (zero-init, as timm). The token grid is
    `sqrt(N)` of the static input; when it differs from `resolution` the table is resized
    bilinearly first (see `resize_bias_table`). With fixed weights the whole bias folds into a
    constant in TFLite.
    """

    def __init__(self, resolution: int = BIAS_RESOLUTION, **kwargs):
        super().__init__(**kwargs)
        self.resolution = int(resolution)

    def build(self, input_shape):
        heads, n = input_shape[1], input_shape[-1]
        grid = int(round(n**0.5)) if n is not None else 0
        if heads is None or grid * grid != n or input_shape[-2] != n:
            raise ValueError(
                f"AttentionBias needs square logits over a square grid, got {input_shape}")
        self.grid = grid
        self.attention_biases = self.add_weight(
            name="attention_biases",
            shape=(heads, self.resolution * self.resolution),
            initializer="zeros",
            trainable=True,
        )
        self._index = relative_position_index(grid)
        super().build(input_shape)

    def call(self, inputs):
        table = resize_bias_table(self.attention_biases, self.grid)
        bias = tf.gather(table, self._index, axis=1)  # [heads, N, N]
        return inputs + tf.cast(bias, inputs.dtype)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "resolution": self.resolution}


CUSTOM_OBJECTS.update({"AttentionBias": AttentionBias})

FAMILY = Family(
    "efficientformer",
    structured_pruning=True,
    timm_names={n: n for n in ("efficientformer_l1", "efficientformer_l3", "efficientformer_l7")},
    timm_build={"with_distillation_head": True},  # timm's checkpoints carry both heads
    quantize={"AttentionBias": qat.output("learned bias added to attention logits: table stays "
                                          "float, output quantized")},
)


# --------------------------------------------------------------------------------------------
# Building blocks


def _bn(x, name):
    return keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=name)(x)


def _conv3x3_s2(x, filters, name):
    """PyTorch conv3x3 stride 2 padding 1 (bias): explicit zero padding + 'valid'."""
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(filters, 3, strides=2, padding="valid", name=name)(x)


def meta4d(x, dim: int, name: str, hidden: int | None = None):
    """Pool block: x + ls1*(avgpool(x) - x); x + ls2*(BN(1x1(GELU(BN(1x1(x))))))."""
    y = keras.layers.AveragePooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    y = keras.layers.Subtract(name=f"{name}_pool_sub")([y, x])
    y = LayerScale(LAYER_SCALE_INIT, name=f"{name}_ls1")(y)
    x = keras.layers.Add(name=f"{name}_add1")([x, y])
    y = keras.layers.Conv2D(hidden or dim * MLP_RATIO, 1, name=f"{name}_mlp_fc1")(x)
    y = _bn(y, f"{name}_mlp_bn1")
    y = keras.layers.Activation("gelu", name=f"{name}_mlp_gelu")(y)
    y = keras.layers.Conv2D(dim, 1, name=f"{name}_mlp_fc2")(y)
    y = _bn(y, f"{name}_mlp_bn2")
    y = LayerScale(LAYER_SCALE_INIT, name=f"{name}_ls2")(y)
    return keras.layers.Add(name=f"{name}_add2")([x, y])


def attention(x, dim: int, name: str, heads: int = HEADS):
    """8 heads (the reference), key dim 32, value dim 128 per head; logits + relative-position
    bias."""
    q = keras.layers.Dense(heads * KEY_DIM, name=f"{name}_q")(x)
    k = keras.layers.Dense(heads * KEY_DIM, name=f"{name}_k")(x)
    v = keras.layers.Dense(heads * KEY_DIM * ATTN_RATIO, name=f"{name}_v")(x)
    q = split_heads(q, heads=heads, name=f"{name}_q_heads")
    k = split_heads(k, heads=heads, name=f"{name}_k_heads")
    v = split_heads(v, heads=heads, name=f"{name}_v_heads")
    q = Scale(KEY_DIM**-0.5, name=f"{name}_scale")(q)
    attn = MatMul(transpose_b=True, name=f"{name}_qk")([q, k])  # [B, h, N, N]
    attn = AttentionBias(BIAS_RESOLUTION, name=f"{name}_bias")(attn)
    attn = keras.layers.Softmax(axis=-1, name=f"{name}_softmax")(attn)
    out = MatMul(name=f"{name}_av")([attn, v])  # [B, h, N, 128]
    out = merge_heads(out, name=f"{name}_merge")
    return keras.layers.Dense(dim, name=f"{name}_proj")(out)


def meta3d(x, dim: int, name: str, hidden: int | None = None, heads: int = HEADS):
    """Attention block on tokens: x + ls1*attn(LN(x)); x + ls2*MLP(LN(x))."""
    y = keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{name}_ln1")(x)
    y = attention(y, dim, f"{name}_attn", heads)
    y = LayerScale(LAYER_SCALE_INIT, name=f"{name}_ls1")(y)
    x = keras.layers.Add(name=f"{name}_add1")([x, y])
    y = keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{name}_ln2")(x)
    y = keras.layers.Dense(hidden or dim * MLP_RATIO, name=f"{name}_mlp_fc1")(y)
    y = keras.layers.Activation("gelu", name=f"{name}_mlp_gelu")(y)
    y = keras.layers.Dense(dim, name=f"{name}_mlp_fc2")(y)
    y = LayerScale(LAYER_SCALE_INIT, name=f"{name}_ls2")(y)
    return keras.layers.Add(name=f"{name}_add2")([x, y])


def default_widths(*, widths, depths, num_vit: int, **_) -> dict:
    """The reference's block widths in the `block_widths=` format of `build_efficientformer`:
    `mlp` (MLP hidden units of every Meta4D and Meta3D block, in build order) and `heads`
    (attention heads of every Meta3D block)."""
    mlp = [dim * MLP_RATIO for dim, depth in zip(widths, depths) for _ in range(depth)]
    return dict(mlp=mlp, heads=[HEADS] * num_vit)


def build_efficientformer(
    *,
    widths,
    depths,
    num_vit: int,
    num_classes: int = 1000,
    input_size: int | None = None,
    dropout: float = 0.0,
    with_distillation_head: bool = False,
    block_widths: dict | None = None,
    name: str = "efficientformer",
) -> keras.Model:
    """An EfficientFormer v1 classifier on a fixed `input_size` (default 224) RGB input.

    Inputs are expected normalised with ImageNet mean/std, as timm's. Output: the average of
    the class and distillation heads, or `[class_logits, distill_logits]` with
    `with_distillation_head=True`.

    `block_widths` (the registry's `widths=` override; `widths` here are the stage widths of
    the config): a thinner model of the same layout and layer names (structured pruning,
    `compress/structured.py`), a dict of lists as `default_widths` returns, any key left out
    keeping the reference's. None builds the reference model.
    """
    size = input_size or DEFAULT_SIZE
    if size % 32:
        raise ValueError(f"EfficientFormer input size must be a multiple of 32, got {size}")
    bw = resolve_widths(block_widths, default_widths(widths=widths, depths=depths,
                                                     num_vit=num_vit), name)
    mlp, heads = iter(bw["mlp"]), iter(bw["heads"])
    inputs = keras.Input((size, size, 3), name="image")
    x = _conv3x3_s2(inputs, widths[0] // 2, "stem_conv1")
    x = _bn(x, "stem_bn1")
    x = keras.layers.ReLU(name="stem_relu1")(x)
    x = _conv3x3_s2(x, widths[0], "stem_conv2")
    x = _bn(x, "stem_bn2")
    x = keras.layers.ReLU(name="stem_relu2")(x)
    last = len(depths) - 1
    for i, (dim, depth) in enumerate(zip(widths, depths)):
        if i > 0:
            x = _conv3x3_s2(x, dim, f"stage{i}_downsample_conv")
            x = _bn(x, f"stage{i}_downsample_bn")
        n3d = num_vit if i == last else 0
        for j in range(depth):
            if j == depth - n3d:
                x = keras.layers.Reshape((-1, dim), name=f"stage{i}_flat")(x)
            if j >= depth - n3d:
                x = meta3d(x, dim, f"stage{i}_block{j}", next(mlp), next(heads))
            else:
                x = meta4d(x, dim, f"stage{i}_block{j}", next(mlp))
    x = keras.layers.LayerNormalization(epsilon=LN_EPS, name="norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_drop")(x)
    cls = keras.layers.Dense(num_classes, name="head")(x)
    dist = keras.layers.Dense(num_classes, name="head_dist")(x)
    if with_distillation_head:
        return keras.Model(inputs, [cls, dist], name=name)
    out = keras.layers.Average(name="head_avg")([cls, dist])
    return keras.Model(inputs, out, name=name)


def _builder(variant):
    def build(*, num_classes=1000, input_size=None, widths=None, **overrides):
        cfg = dict(widths=WIDTHS[variant], depths=DEPTHS[variant], num_vit=NUM_VIT[variant])
        return build_efficientformer(num_classes=num_classes, input_size=input_size,
                                     name=f"efficientformer_{variant}", block_widths=widths,
                                     **{**cfg, **overrides})
    return build


_REG = dict(default_size=DEFAULT_SIZE, size_divisor=32, family="efficientformer", fixed_size=True)


@register_model(params=12_289_928, **_REG)
def efficientformer_l1(*, num_classes=1000, input_size=None, **overrides):
    return _builder("l1")(num_classes=num_classes, input_size=input_size, **overrides)


@register_model(params=31_406_000, **_REG)
def efficientformer_l3(*, num_classes=1000, input_size=None, **overrides):
    return _builder("l3")(num_classes=num_classes, input_size=input_size, **overrides)


@register_model(params=82_229_328, **_REG)
def efficientformer_l7(*, num_classes=1000, input_size=None, **overrides):
    return _builder("l7")(num_classes=num_classes, input_size=input_size, **overrides)


# --------------------------------------------------------------------------------------------
# timm state dicts


def _conv_kernel(w):  # OIHW -> HWIO
    return np.transpose(w, (2, 3, 1, 0))


def _linear_kernel(w):  # (out, in) -> (in, out)
    return np.transpose(w)


def _split_qkv(w, b):
    """timm's qkv rows, per head [q 32 | k 32 | v 128], -> heads-major q, k, v (kernel, bias)."""
    per_head = 2 * KEY_DIM + KEY_DIM * ATTN_RATIO
    if w.shape[0] != HEADS * per_head:
        raise ValueError(f"qkv weight has {w.shape[0]} rows, expected {HEADS * per_head}")
    w = w.reshape(HEADS, per_head, -1)
    b = b.reshape(HEADS, per_head)
    parts, start = [], 0
    for width in (KEY_DIM, KEY_DIM, KEY_DIM * ATTN_RATIO):
        sl = slice(start, start + width)
        parts.append((_linear_kernel(w[:, sl].reshape(HEADS * width, -1)), b[:, sl].reshape(-1)))
        start += width
    return parts


_BLOCK = re.compile(r"stage(\d+)_block(\d+)_(.+)")


def convert_timm_state_dict(model: keras.Model, state_dict) -> dict:
    """Load a timm `efficientformer_l*` state dict (names -> NumPy arrays) into `model`.

    Every weight of the model is filled (BN running statistics included); every parameter and
    buffer of the state dict must be used. Missing keys, unexpected keys and mismatches (shapes,
    an `attention_bias_idxs` buffer other than this module's index) raise one `ValueError` line
    naming a few of each; nothing is loaded then. `num_batches_tracked` buffers are ignored.
    Snap-research (original) key names are not remapped: pass them through timm's
    `checkpoint_filter_fn`.

    Args:
      model: a model built by this module (any `num_classes` matching the heads, any input
        size: the 7x7 bias table is stored as is).
      state_dict: mapping of timm names to arrays (e.g. `{k: v.numpy() for k, v in
        timm_model.state_dict().items()}`).
    Returns: a summary dict: `loaded` (sorted timm keys used), `ignored` (keys left out on
      purpose).
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    used, errors = set(), []

    def get(key):
        used.add(key)
        return sd.get(key)

    # Meta4D blocks per stage (to map Keras block indices to timm's, where Flat takes a slot).
    n4d: dict[int, int] = {}
    has_flat = set()
    for layer in model.layers:
        m = _BLOCK.fullmatch(layer.name)
        if m and m.group(3) == "pool":
            n4d[int(m.group(1))] = max(n4d.get(int(m.group(1)), 0), int(m.group(2)) + 1)
        fm = re.fullmatch(r"stage(\d+)_flat", layer.name)
        if fm:
            has_flat.add(int(fm.group(1)))

    def timm_block(stage, j):
        t = j + 1 if stage in has_flat and j >= n4d.get(stage, 0) else j
        return f"stages.{stage}.blocks.{t}."

    def bn(prefix):
        return [get(prefix + s) for s in ("weight", "bias", "running_mean", "running_var")]

    def conv(prefix):
        w = get(prefix + "weight")
        return [None if w is None else _conv_kernel(w), get(prefix + "bias")]

    def linear(prefix):
        w = get(prefix + "weight")
        return [None if w is None else _linear_kernel(w), get(prefix + "bias")]

    def ln(prefix):
        return [get(prefix + "weight"), get(prefix + "bias")]

    qkv_cache = {}

    def qkv_part(prefix, idx):
        if prefix not in qkv_cache:
            w, b = get(prefix + "weight"), get(prefix + "bias")
            qkv_cache[prefix] = None if w is None or b is None else _split_qkv(w, b)
        parts = qkv_cache[prefix]
        return [None, None] if parts is None else list(parts[idx])

    def values_for(layer):
        nm = layer.name
        stem = re.fullmatch(r"stem_(conv|bn)(\d)", nm)
        if stem:
            p = f"stem.{'conv' if stem.group(1) == 'conv' else 'norm'}{stem.group(2)}."
            return conv(p) if stem.group(1) == "conv" else bn(p)
        ds = re.fullmatch(r"stage(\d+)_downsample_(conv|bn)", nm)
        if ds:
            p = f"stages.{ds.group(1)}.downsample."
            return conv(p + "conv.") if ds.group(2) == "conv" else bn(p + "norm.")
        if nm == "norm":
            return ln("norm.")
        if nm in ("head", "head_dist"):
            return linear(nm + ".")
        m = _BLOCK.fullmatch(nm)
        if not m:
            raise ValueError(f"layer {nm!r} has weights but no timm counterpart")
        p, part = timm_block(int(m.group(1)), int(m.group(2))), m.group(3)
        if part in ("ls1", "ls2"):
            return [get(f"{p}{part}.gamma")]
        if part in ("ln1", "ln2"):
            return ln(f"{p}norm{part[-1]}.")
        if part in ("mlp_fc1", "mlp_fc2"):
            fc = f"{p}mlp.fc{part[-1]}."
            return conv(fc) if isinstance(layer, keras.layers.Conv2D) else linear(fc)
        if part in ("mlp_bn1", "mlp_bn2"):
            return bn(f"{p}mlp.norm{part[-1]}.")
        if part in ("attn_q", "attn_k", "attn_v"):
            return qkv_part(f"{p}token_mixer.qkv.", "qkv".index(part[-1]))
        if part == "attn_proj":
            return linear(f"{p}token_mixer.proj.")
        if part == "attn_bias":
            key = f"{p}token_mixer.attention_bias_idxs"
            if key in sd:
                used.add(key)
                res = layer.resolution
                if not np.array_equal(sd[key], relative_position_index(res)):
                    errors.append(f"{key} differs from the |drow|*{res}+|dcol| index")
            return [get(f"{p}token_mixer.attention_biases")]
        raise ValueError(f"layer {nm!r} has weights but no timm counterpart")

    assignments = []
    for layer in model.layers:
        if not layer.weights:
            continue
        vals = values_for(layer)
        if len(vals) != len(layer.weights):
            raise ValueError(
                f"layer {layer.name!r}: {len(layer.weights)} weights, mapped {len(vals)}")
        for w, v in zip(layer.weights, vals):
            if v is not None and tuple(v.shape) != tuple(w.shape):
                errors.append(f"{layer.name}/{w.name.split('/')[-1]}: model shape "
                              f"{tuple(w.shape)}, checkpoint shape {tuple(v.shape)}")
        assignments.append((layer, vals))

    ignored = sorted(k for k in sd if k.endswith("num_batches_tracked"))
    problems = key_problems(sd, used, ignored=ignored)
    if errors:
        problems.append(f"{len(errors)} mismatch(es): {few(errors, 2)}")
    if problems:
        raise ValueError(f"timm state dict does not fit {model.name!r}: " + "; ".join(problems))
    for layer, vals in assignments:
        layer.set_weights([v.astype(w.dtype.as_numpy_dtype) for w, v in zip(layer.weights, vals)])
    return {"loaded": sorted(used), "ignored": ignored}
