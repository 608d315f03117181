"""Small custom layers shared by every family, written for compression.

Rules (see CONTRIBUTING.md, "Writing a model"):
  * every layer is a stock Keras layer or one of the small layers here (or in a family
    module), so tfmot can see, prune and quantize each piece;
  * custom layers implement `get_config` (so `clone_model`, which pruning and QAT use,
    can rebuild them) and `get_prunable_weights()` (the weights magnitude pruning may
    touch; `[]` for weightless layers and for weights that must stay dense);
  * no raw `tf.*` calls in model code (they become `TFOpLambda` layers that tfmot
    cannot handle) and no transposes above rank 4 (TFLite limit).
"""

from __future__ import annotations

from models import qat
from models.compat import keras, tf


class MatMul(keras.layers.Layer):
    """Weightless batched matrix product `a @ b` (`aᵀ`, `bᵀ` on request), e.g. q·kᵀ and attn·v."""

    def __init__(self, transpose_b: bool = False, transpose_a: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.transpose_b = bool(transpose_b)
        self.transpose_a = bool(transpose_a)

    def call(self, inputs):
        a, b = inputs
        return tf.matmul(a, b, transpose_a=self.transpose_a, transpose_b=self.transpose_b)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "transpose_b": self.transpose_b,
                "transpose_a": self.transpose_a}


class AxisSoftmax(keras.layers.Layer):
    """Weightless softmax over `axis` written as its ops: exp(x - max) / sum(exp(x - max)).

    For a softmax over a short axis that is not the last one. XNNPACK's SOFTMAX works row by
    row, and over a short last axis its per-row cost dominates: Mobile-Former's
    Former->Mobile attention normalises over 3-6 tokens for each of thousands of pixels
    ([2, 3136, 6] at 56x56: 0.098 ms, one thread). The same logits laid out [2, 6, 3136] and
    normalised over axis -2 with REDUCE_MAX / SUB / EXP / SUM / DIV take 0.016 ms, transposes
    included. The export keeps these ops float (like SOFTMAX, which XNNPACK runs in float only).
    """

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)

    def call(self, inputs):
        e = tf.exp(inputs - tf.reduce_max(inputs, axis=self.axis, keepdims=True))
        return e / tf.reduce_sum(e, axis=self.axis, keepdims=True)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


class Scale(keras.layers.Layer):
    """Weightless multiplication by a constant (the attention's 1/sqrt(head_dim))."""

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        return inputs * tf.cast(self.scale, inputs.dtype)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


class LayerScale(keras.layers.Layer):
    """Per-channel learned scale `x * gamma` (CaiT / EfficientFormer layer scale)."""

    def __init__(self, init_value: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        return inputs * tf.cast(self.gamma, inputs.dtype)

    def get_prunable_weights(self):
        return []  # one scalar per channel: pruning it would switch whole channels off

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


def split_heads(x, *, heads: int, name: str):
    """[B, N, heads*hd] -> [B, heads, N, hd] with stock Reshape/Permute (rank 4)."""
    head_dim = x.shape[-1] // heads
    x = keras.layers.Reshape((-1, heads, head_dim), name=f"{name}_reshape")(x)
    return keras.layers.Permute((2, 1, 3), name=f"{name}_permute")(x)


def merge_heads(x, *, name: str):
    """[B, heads, N, hd] -> [B, N, heads*hd]."""
    heads, head_dim = x.shape[1], x.shape[-1]
    x = keras.layers.Permute((2, 1, 3), name=f"{name}_permute")(x)
    return keras.layers.Reshape((-1, heads * head_dim), name=f"{name}_reshape")(x)


def multi_head_attention(
    x, *, dim: int, heads: int, name: str, qkv_bias: bool = True, out_dim: int | None = None
):
    """Multi-head self-attention as explicit layers: Dense q/k/v, scaled q·kᵀ, softmax, ·v, Dense.

    q, k and v are three Dense layers (the reference's fused qkv Linear is split when its
    weights are loaded): the same parameters, and no SPLIT_V op in TFLite graphs (XNNPACK
    does not take it).

    Args:
      x: tokens [B, N, C].
      dim: q/k/v width (heads * head_dim).
      out_dim: width of the output projection (default: the input width C).
    Returns: [B, N, out_dim].
    """
    head_dim = dim // heads
    q = keras.layers.Dense(dim, use_bias=qkv_bias, name=f"{name}_q")(x)
    k = keras.layers.Dense(dim, use_bias=qkv_bias, name=f"{name}_k")(x)
    v = keras.layers.Dense(dim, use_bias=qkv_bias, name=f"{name}_v")(x)
    q = split_heads(q, heads=heads, name=f"{name}_q_heads")
    k = split_heads(k, heads=heads, name=f"{name}_k_heads")
    v = split_heads(v, heads=heads, name=f"{name}_v_heads")
    q = Scale(head_dim**-0.5, name=f"{name}_scale")(q)
    attn = MatMul(transpose_b=True, name=f"{name}_qk")([q, k])  # [B, h, N, N]
    attn = keras.layers.Softmax(axis=-1, name=f"{name}_softmax")(attn)
    out = MatMul(name=f"{name}_av")([attn, v])  # [B, h, N, hd]
    out = merge_heads(out, name=f"{name}_merge")
    return keras.layers.Dense(out_dim or x.shape[-1], name=f"{name}_proj")(out)


# Custom objects for `keras.models.load_model` / `clone_model`; family modules add theirs.
CUSTOM_OBJECTS = {"MatMul": MatMul, "Scale": Scale, "LayerScale": LayerScale,
                  "AxisSoftmax": AxisSoftmax}

# How QAT treats these layers (`compress.quantize`); family modules declare theirs in `FAMILY`.
QUANTIZE = {
    "MatMul": qat.output("q·kᵀ and attn·v: the BATCH_MATMUL output must be fake-quantized or it "
                         "stays float in TFLite"),
    "Scale": qat.output("constant multiply (1/sqrt(head_dim))"),
    "LayerScale": qat.weights("gamma", why="per-channel multiplier: gamma and output quantized"),
    "AxisSoftmax": qat.noop("a softmax written as max/exp/sum/div ops: kept float like Softmax "
                            "(the export keeps its ops float)"),
}
