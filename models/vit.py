"""Vision Transformer teachers (ViT-Ti/S/B, patch 16), arXiv:2010.11929.

Configs from google-research/vision_transformer `vit_jax/configs/models.py`; parameter counts
equal timm's `vit_{tiny,small,base}_patch16_224` at 1000 classes. Pre-norm blocks, LayerNorm
eps 1e-6, exact (erf) GELU, class-token head. Any input that is a multiple of 16 works: the
learned position embedding is resampled (bicubic, as timm) to the patch grid of the input.

Differences from the reference: the fused qkv projection is three Dense layers (same weights,
see `models.layers.multi_head_attention`); no stochastic depth.
"""

from __future__ import annotations

import numpy as np

from models.compat import keras, tf
from models.layers import CUSTOM_OBJECTS, multi_head_attention
from models import qat
from models.registry import Family, register_model

FAMILY = Family(
    "vit",
    timm_names={"vit_tiny_patch16": "vit_tiny_patch16_224",
                "vit_small_patch16": "vit_small_patch16_224",
                "vit_base_patch16": "vit_base_patch16_224"},
    timm_converter="models.vit_checkpoints",
    quantize={
        "ClassTokenPosEmbed": qat.output("cls token and position embedding are added, not "
                                         "multiplied: they stay float in QAT (the converter "
                                         "quantizes the constant), output quantized"),
        "TakeToken": qat.noop("slices one token: moves values"),
    },
)

# The registered ViT sizes: size name -> `build_vit` arguments (model `vit_<size>_patch16`).
VIT_CONFIGS = {
    "tiny": dict(dim=192, depth=12, heads=3, mlp_dim=768),
    "small": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
    "base": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
}
PATCH = 16
DEFAULT_SIZE = 224
LN_EPS = 1e-6


class ClassTokenPosEmbed(keras.layers.Layer):
    """Prepends the class token and adds the learned position embedding.

    Input: patch grid [B, gh, gw, D]; output: tokens [B, 1 + gh*gw, D]. The embedding is stored
    for the `grid` it was trained at (14x14 at 224 px, as in the checkpoints) and resampled
    bicubically when the input grid differs; at a fixed export size the resampling folds into
    a constant.
    """

    def __init__(self, grid: int, **kwargs):
        super().__init__(**kwargs)
        self.grid = int(grid)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.cls = self.add_weight(name="cls", shape=(1, 1, dim), initializer="zeros")
        self.pos_embedding = self.add_weight(
            name="pos_embedding",
            shape=(1, 1 + self.grid * self.grid, dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        super().build(input_shape)

    def call(self, x):
        shape = tf.shape(x)
        batch, gh, gw, dim = shape[0], shape[1], shape[2], x.shape[-1]
        pos_cls = self.pos_embedding[:, :1]
        pos_grid = tf.reshape(self.pos_embedding[:, 1:], (1, self.grid, self.grid, dim))
        if x.shape[1] != self.grid or x.shape[2] != self.grid:  # static check; None -> resample
            pos_grid = tf.image.resize(pos_grid, (gh, gw), method="bicubic")
        tokens = tf.reshape(x + tf.cast(pos_grid, x.dtype), (batch, -1, dim))
        cls = tf.cast(self.cls + pos_cls, x.dtype)
        return tf.concat([tf.tile(cls, (batch, 1, 1)), tokens], axis=1)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "grid": self.grid}


class TakeToken(keras.layers.Layer):
    """Weightless: tokens [B, N, D] -> token `index` [B, D] (the class token)."""

    def __init__(self, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, x):
        # SLICE with explicit sizes + RESHAPE: XNNPACK takes neither x[:, i] (STRIDED_SLICE) nor a
        # SLICE with -1 sizes, which would split the graph into two partitions
        size = tf.stack([tf.shape(x)[0], 1, x.shape[-1]])  # no -1 sizes: XNNPACK refuses those
        token = tf.slice(x, [0, self.index, 0], size)
        return tf.reshape(token, (-1, x.shape[-1]))

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "index": self.index}


CUSTOM_OBJECTS.update({"ClassTokenPosEmbed": ClassTokenPosEmbed, "TakeToken": TakeToken})


def build_vit(
    *,
    dim: int,
    depth: int,
    heads: int,
    mlp_dim: int,
    num_classes: int = 1000,
    input_size: int | None = None,
    dropout: float = 0.0,
    patch: int = PATCH,
    pos_grid: int | None = None,
    ln_eps: float = LN_EPS,
    pre_norm: bool = False,
    patch_bias: bool = True,
    name: str = "vit",
) -> keras.Model:
    """A ViT classifier; input RGB in [0, 1] scaled as the caller's preprocessing decides.

    The defaults are the registered ViT-Ti/S/B. The other options exist for checkpoints of
    other layouts (`models.vit_checkpoints`): `pos_grid` is the patch grid the position
    embedding is stored for (default 224 // patch; a teacher loaded from a checkpoint stores it
    at its training size, so no resampling runs there), `ln_eps` the LayerNorm epsilon (Hugging
    Face configs say 1e-12), `pre_norm` a LayerNorm after the embedding and `patch_bias=False`
    a bias-free patch projection (timm's CLIP-style `pre_norm=True` ViTs).
    """
    shape = (input_size, input_size, 3) if input_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.Conv2D(dim, patch, strides=patch, use_bias=patch_bias,
                            name="patch_embed")(inputs)
    x = ClassTokenPosEmbed(pos_grid or DEFAULT_SIZE // patch, name="pos_embed")(x)
    if pre_norm:
        x = keras.layers.LayerNormalization(epsilon=ln_eps, name="norm_pre")(x)
    for i in range(depth):
        p = f"block{i}"
        y = keras.layers.LayerNormalization(epsilon=ln_eps, name=f"{p}_ln1")(x)
        y = multi_head_attention(y, dim=dim, heads=heads, name=f"{p}_attn")
        x = keras.layers.Add(name=f"{p}_add1")([x, y])
        y = keras.layers.LayerNormalization(epsilon=ln_eps, name=f"{p}_ln2")(x)
        y = keras.layers.Dense(mlp_dim, name=f"{p}_mlp_fc1")(y)
        y = keras.layers.Activation("gelu", name=f"{p}_mlp_gelu")(y)
        y = keras.layers.Dense(dim, name=f"{p}_mlp_fc2")(y)
        x = keras.layers.Add(name=f"{p}_add2")([x, y])
    x = keras.layers.LayerNormalization(epsilon=ln_eps, name="norm")(x)
    x = TakeToken(0, name="cls_token")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_drop")(x)
    x = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, x, name=name)


@register_model(params=5_717_416, default_size=224, size_divisor=16, family="vit", role="teacher")
def vit_tiny_patch16(*, num_classes=1000, input_size=None, **overrides):
    return build_vit(num_classes=num_classes, input_size=input_size, name="vit_tiny_patch16",
                     **{**VIT_CONFIGS["tiny"], **overrides})


@register_model(params=22_050_664, default_size=224, size_divisor=16, family="vit", role="teacher")
def vit_small_patch16(*, num_classes=1000, input_size=None, **overrides):
    return build_vit(num_classes=num_classes, input_size=input_size, name="vit_small_patch16",
                     **{**VIT_CONFIGS["small"], **overrides})


@register_model(params=86_567_656, default_size=224, size_divisor=16, family="vit", role="teacher")
def vit_base_patch16(*, num_classes=1000, input_size=None, **overrides):
    return build_vit(num_classes=num_classes, input_size=input_size, name="vit_base_patch16",
                     **{**VIT_CONFIGS["base"], **overrides})


# --------------------------------------------------------------------------------------------
# Google ViT checkpoints (.npz, Flax key layout), README of google-research/vision_transformer.


def resample_pos_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
    """[1, 1+g*g, D] at any square grid -> [1, 1+grid*grid, D] (bicubic on the patch part).

    Antialiased bicubic, which equals timm's `resample_abs_pos_embed` (within 1e-5, up and
    down), so a resampled checkpoint behaves as timm's own resampled model.
    """
    n = pos.shape[1] - 1
    old = int(round(np.sqrt(n)))
    if old * old != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if old == grid:
        return pos
    g = tf.reshape(pos[:, 1:], (1, old, old, pos.shape[-1]))
    g = tf.image.resize(g, (grid, grid), method="bicubic", antialias=True)
    g = g.numpy().reshape(1, grid * grid, -1)
    return np.concatenate([pos[:, :1], g], axis=1)


def load_google_npz(model: keras.Model, path: str, *, load_head: bool | None = None) -> dict:
    """Load an original Google ViT checkpoint (`.npz`) into a model built by `build_vit`.

    Handles the original layout (`MultiHeadDotProductAttention_1`, `MlpBlock_3`,
    `LayerNorm_0/2`) and the big_vision one (`..._0`, `MlpBlock_0`, `LayerNorm_0/1`). The
    position embedding is resampled when its grid differs (e.g. 384-px fine-tunes).

    Args:
      load_head: load `head/*`; default: only if its class count equals the model's, so a
        checkpoint can be fine-tuned to a new dataset. A `pre_logits` layer is not supported
        (the i21k-only files); it raises.
    Returns: a summary dict (`loaded` keys, `head_loaded`).
    """
    try:
        w = dict(np.load(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"cannot read ViT checkpoint {path!r}: {e}") from e
    if "embedding/kernel" not in w:
        raise ValueError(f"{path!r} is not a Google ViT checkpoint (no 'embedding/kernel' key)")
    if any(k.startswith("pre_logits/") for k in w):
        raise ValueError(f"{path!r} has a pre_logits layer (an i21k-only checkpoint); use a "
                         "checkpoint without representation_size")
    used = set()

    def get(key):
        if key not in w:
            raise ValueError(f"{path!r} lacks key {key!r}")
        used.add(key)
        return w[key]

    big_vision = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in w
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision \
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    layer = model.get_layer
    depth = sum(1 for l in model.layers if l.name.endswith("_ln1"))
    dim = layer("patch_embed").filters
    if get("embedding/kernel").shape[-1] != dim:
        raise ValueError(f"{path!r} has width {w['embedding/kernel'].shape[-1]}, model has {dim}")

    layer("patch_embed").set_weights([get("embedding/kernel"), get("embedding/bias")])
    pe = layer("pos_embed")
    pos = get("Transformer/posembed_input/pos_embedding")
    pe.set_weights([get("cls"), resample_pos_embedding(pos, pe.grid)])
    for i in range(depth):
        b, p = f"Transformer/encoderblock_{i}/", f"block{i}"
        layer(f"{p}_ln1").set_weights([get(b + "LayerNorm_0/scale"), get(b + "LayerNorm_0/bias")])
        for part in ("query", "key", "value"):
            kern = get(f"{b}{mha}/{part}/kernel")  # [D, heads, hd]
            bias = get(f"{b}{mha}/{part}/bias")  # [heads, hd]
            layer(f"{p}_attn_{part[0]}").set_weights([kern.reshape(dim, -1), bias.reshape(-1)])
        out = get(f"{b}{mha}/out/kernel")  # [heads, hd, D]
        layer(f"{p}_attn_proj").set_weights([out.reshape(-1, dim), get(f"{b}{mha}/out/bias")])
        layer(f"{p}_ln2").set_weights([get(f"{b}{ln2}/scale"), get(f"{b}{ln2}/bias")])
        for j in (0, 1):
            layer(f"{p}_mlp_fc{j + 1}").set_weights(
                [get(f"{b}{mlp}/Dense_{j}/kernel"), get(f"{b}{mlp}/Dense_{j}/bias")])
    layer("norm").set_weights([get("Transformer/encoder_norm/scale"),
                               get("Transformer/encoder_norm/bias")])
    head = layer("head")
    if load_head is None:
        load_head = "head/kernel" in w and w["head/kernel"].shape == tuple(head.kernel.shape)
    if load_head:
        head.set_weights([get("head/kernel"), get("head/bias")])
    return {"loaded": sorted(used), "head_loaded": bool(load_head)}
