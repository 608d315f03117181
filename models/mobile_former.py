"""Mobile-Former (26M ... 508M), Chen et al., "Mobile-Former: Bridging MobileNet and
Transformer", CVPR 2022, arXiv:2108.05895.

A Keras port of the authors' PyTorch code `AAboys/MobileFormer` (`mobile_former.py`,
`dna_blocks.py`, timm-0.3.4 based), written from its description; trainable parameter counts
equal that code's at 1000 classes for all seven variants.

Structure (features x are NHWC [B, H, W, C]; tokens z are [B, T, d], batch first):
  * a learned table of T global tokens (`GlobalTokens`), broadcast over the batch; token 0 drives
    every dynamic ReLU and is concatenated into the classifier;
  * stem 3x3/2 conv + BN + ReLU6, then a flat list of `DnaBlock3` (downsampling / first blocks)
    and `DnaBlock` (stride-1) blocks, each = Mobile->Former bridge (2 heads, keys = values = the
    raw feature map, gated by 2*h-sigmoid, post-LN) -> Former (4 heads, q projection only, keys =
    values = tokens, post-LN, FFN x2 with GELU) -> Mobile sub-block with dynamic ReLUs (K=2
    slopes from token 0, one hyper MLP per activation) -> Former->Mobile bridge (2 heads,
    queries = the raw feature map, keys/values projected from the tokens, added to the map);
  * a last Mobile->Former bridge, then the classifier: 1x1 conv (6C) + BN + ReLU6 -> global
    average pool -> h-swish -> concat token 0 -> Dense + BN + h-swish -> Dropout -> Dense.

Layer names follow the reference modules: `block{i}_l2g_*` (Local2Global: `q`, `gate` = the
reference's `alpha`, `proj`, `ln`), `block{i}_former_*` (GlobalBlock: `q`, `proj` = the
reference's `channel_mlp`, `ln1`, `ffn_fc1`, `ffn_fc2`, `ln2`), `block{i}_g2l_*` (Global2Local:
`k`, `v` = the reference's `proj`), `block{i}_conv{j}` + `_bn`, `block{i}_hyper{j}_fc1/_fc2`
(HyperFunc; DnaBlock uses hyper1/hyper2, DnaBlock3 hyper1/hyper3, as the reference),
`final_l2g_*`, `head_conv`, `head_fc`, `head_fc_bn`, `head` (the 1000-way Linear).

Differences from the reference:
  * no stochastic depth (drop-path); the reference's training commands use 0;
  * PyTorch grouped 1x1 convs (26M only) are one bias-free Conv2D per group between a weightless
    `GroupSplit` and a Concatenate (TFLite has no grouped conv); channel shuffles are a weightless
    rank-4 reshape/transpose layer; same parameters, same function;
  * an expanding depthwise conv at stride 1 is `ChannelRepeat` (a constant one-hot 1x1 conv) +
    a plain depthwise conv over the repeated channels (`depthwise_conv_bn`; same kernel values
    and parameter count, several times faster under XNNPACK);
  * the attention scale multiplies the (smaller) token-side operand (q in Mobile->Former and the
    Former, k in Former->Mobile) instead of the attention logits: the same function;
  * the two bridges compute all heads in one product with the whole feature map against
    block-diagonal token operands (`HeadBlocks`: each head's tokens with the other heads'
    channels zeroed), instead of splitting the map into heads: the same function and
    parameters, no transposes or dynamic-operand packing of the map (int8 mobile_former_26m
    2.30 -> 2.03 ms, 294m 4.51 -> 3.94 ms, 508m 6.66 -> 5.61 ms; fp32 within noise; one thread,
    Zen 5 VM, medians of 5 interleaved fresh processes); their zero blocks add 2-4% to the
    model's MACs;
  * the only other code paths of the reference (gbr_type 'mlp', hyper_token_id -1, 'sepdw' /
    'maxdw' convs, drop-branch, `remove_proj_local=False`) are not used by any variant and are
    not ported.
"""

from __future__ import annotations

import math

import numpy as np

from models.compat import keras, tf
from models.layers import (CUSTOM_OBJECTS, AxisSoftmax, MatMul, Scale, merge_heads,
                           split_heads)
from models import qat
from models.registry import Family, register_model, resolve_widths
from models.vit import TakeToken

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
LN_EPS = 1e-5
BRIDGE_HEADS = 2
FORMER_HEADS = 4
FFN_RATIO = 2
HYPER_REDUCTION = 4
LAST_EXP = 6


# === Layers ===================================================================================


class GlobalTokens(keras.layers.Layer):
    """The learned T x d global tokens (`nn.Embedding(T, d)`), broadcast over the batch.

    Input: any tensor whose first axis is the batch (the image); output [B, T, d].
    """

    def __init__(self, num_tokens: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = int(num_tokens)
        self.dim = int(dim)

    def build(self, input_shape):
        self.tokens = self.add_weight(
            name="tokens",
            shape=(self.num_tokens, self.dim),
            initializer=keras.initializers.RandomNormal(stddev=1.0),  # nn.Embedding default
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        batch = tf.shape(inputs)[0]
        tokens = tf.cast(self.tokens, self.compute_dtype)[None]
        return tf.broadcast_to(tokens, tf.stack([batch, self.num_tokens, self.dim]))

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], self.num_tokens, self.dim])

    def get_prunable_weights(self):
        return []  # the tokens are learned inputs, not a kernel

    def get_config(self):
        return {**super().get_config(), "num_tokens": self.num_tokens, "dim": self.dim}


class HardSigmoid(keras.layers.Layer):
    """Weightless h-sigmoid `ReLU6(x + 3) / 6 * scale` (the reference's `h_sigmoid(h_max)`)."""

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        return tf.nn.relu6(inputs + 3.0) * (self.scale / 6.0)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


class HardSwish(keras.layers.Layer):
    """Weightless h-swish `x * ReLU6(x + 3) / 6`."""

    def call(self, inputs):
        return inputs * tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0)

    def get_prunable_weights(self):
        return []


class DynamicReLU(keras.layers.Layer):
    """Weightless dynamic ReLU with K=2 slopes (the reference's `DyReLU(num_func=2)`).

    Inputs: x [B, ..., C] and a [B, 2C] in [0, 1] (h-sigmoid of the hyper MLP). With
    a1 = (a[:C] - 0.5) * scale + 1 and a2 = (a[C:] - 0.5) * scale, the output is
    max(a1 * x, a2 * x), per sample and channel, broadcast over the spatial axes (computed as
    a2 * x + relu((a1 - a2) * x)). a = 0.5 gives ReLU.
    """

    def __init__(self, scale: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        x, a = inputs
        channels = x.shape[-1]
        a = tf.reshape(a, [-1] + [1] * (x.shape.rank - 2) + [2 * channels])
        a1, a2 = tf.split(a, 2, axis=-1)
        a1 = (a1 - 0.5) * self.scale + 1.0
        a2 = (a2 - 0.5) * self.scale
        # max(u, v) = v + relu(u - v): the same function without a MAXIMUM op, which XNNPACK
        # runs in float only (MUL with a fused RELU and ADD stay int8)
        return x * a2 + tf.nn.relu(x * (a1 - a2))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def _dynamic_shape(x):
    """Static dims where known, dynamic ones from tf.shape otherwise (folds at fixed sizes)."""
    dyn = tf.shape(x)
    return [d if d is not None else dyn[i] for i, d in enumerate(x.shape.as_list())]


class ChannelShuffle(keras.layers.Layer):
    """Weightless ShuffleNet channel shuffle of an NHWC map: [g, C/g] -> [C/g, g] on channels.

    Same permutation as the reference's `view(b, g, C/g, h, w).transpose(1, 2)`; done as
    [B, HW, g, C/g] -> transpose -> reshape so no tensor exceeds rank 4 (TFLite).
    """

    def __init__(self, groups: int, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)

    def call(self, inputs):
        shape = _dynamic_shape(inputs)
        channels = inputs.shape[-1]
        x = tf.reshape(inputs, [shape[0], -1, self.groups, channels // self.groups])
        x = tf.transpose(x, [0, 1, 3, 2])
        return tf.reshape(x, shape)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


class GroupSplit(keras.layers.Layer):
    """Weightless equal split of the channel axis into `groups` contiguous parts (a list).

    Feeds one Conv2D per group: the TFLite-builtin form of a grouped convolution (TFLite has no
    grouped conv). Emits an equal SPLIT, which XNNPACK takes (it does not take SPLIT_V).
    """

    def __init__(self, groups: int, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)

    def call(self, inputs):
        return tf.split(inputs, self.groups, axis=-1)

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape).as_list()
        shape[-1] //= self.groups
        return [tf.TensorShape(shape)] * self.groups

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


class ChannelRepeat(keras.layers.Layer):
    """Weightless: each channel of an NHWC map repeated `repeats` times in place (channel c goes
    to c*r ... c*r + r - 1), i.e. `tf.repeat(x, r, axis=-1)`.

    With it, a depthwise conv with channel multiplier r is `ChannelRepeat(r)` + a plain depthwise
    conv over C*r channels (the same kernel values, reshaped (3, 3, C, r) -> (3, 3, C*r, 1)).
    Computed as a 1x1 convolution with a constant one-hot kernel: a GEMM, which XNNPACK runs fast
    and which int8 represents exactly (weights 1, output scale = input scale); the copies that
    tf.repeat, gather or concatenation lower to are 5-10x slower there (measured at 56x56x24,
    r = 4, one thread).
    """

    def __init__(self, repeats: int, **kwargs):
        super().__init__(**kwargs)
        self.repeats = int(repeats)

    def call(self, inputs):
        c, r = inputs.shape[-1], self.repeats
        kernel = np.zeros((1, 1, c, c * r), np.float32)
        for i in range(c):
            kernel[0, 0, i, i * r:(i + 1) * r] = 1.0
        return tf.nn.conv2d(inputs, tf.constant(kernel, dtype=inputs.dtype), 1, "VALID")

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape).as_list()
        shape[-1] *= self.repeats
        return tf.TensorShape(shape)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "repeats": self.repeats}


class HeadBlocks(keras.layers.Layer):
    """Weightless: tokens [B, T, C] -> [B, heads*T, C], row block h keeping only the channels of
    head h (contiguous groups of C/heads) and zeros elsewhere.

    A product with these rows is every head's product at once: `x·HeadBlocks(q)ᵀ` gives the
    [HW, heads*T] logits of all heads from the whole feature map, and `attn·HeadBlocks(v)` the
    [HW, C] output with each head's channels from its own attention, without splitting the map
    into heads (a transpose of the map) or packing it as a dynamic matmul operand.
    """

    def __init__(self, heads: int, **kwargs):
        super().__init__(**kwargs)
        self.heads = int(heads)

    def _mask(self, channels, dtype):
        m = np.zeros((self.heads, 1, channels), np.float32)
        for h in range(self.heads):
            m[h, 0, h * channels // self.heads:(h + 1) * channels // self.heads] = 1.0
        return tf.constant(m, dtype=dtype)

    def call(self, inputs):
        t, c = inputs.shape[-2], inputs.shape[-1]
        x = tf.expand_dims(inputs, 1) * self._mask(c, inputs.dtype)  # [B, heads, T, C]
        return tf.reshape(x, [-1, self.heads * t, c])

    def compute_output_shape(self, input_shape):
        b, t, c = tf.TensorShape(input_shape).as_list()
        return tf.TensorShape([b, self.heads * t, c])

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


class HeadDiagonal(HeadBlocks):
    """Weightless inverse of `HeadBlocks`: [B, heads*T, C] -> [B, T, C], channel c of token t
    taken from row block h(c) (the head owning c); the other blocks are dropped."""

    def call(self, inputs):
        if self.heads == 1:
            return inputs
        mask = self._mask(inputs.shape[-1], inputs.dtype)
        parts = tf.split(inputs, self.heads, axis=1)  # heads x [B, T, C]
        out = parts[0] * mask[0]
        for h in range(1, self.heads):  # ADDs: XNNPACK has no ADD_N
            out = out + parts[h] * mask[h]
        return out

    def compute_output_shape(self, input_shape):
        b, t, c = tf.TensorShape(input_shape).as_list()
        return tf.TensorShape([b, t // self.heads, c])


class SelectHeads(keras.layers.Layer):
    """Weightless: tokens [B, T, heads*hd] -> [B, T, len(kept)*hd], the channels of the `kept`
    heads (contiguous groups of hd, in order): the keys and values of a Former whose other heads
    structured pruning removed (its keys and values are the token stream, which keeps every
    channel). One slice per run of consecutive kept heads, joined by a concatenation: both
    int8 ops XNNPACK takes, on a few tokens.
    """

    def __init__(self, heads: int, kept, **kwargs):
        super().__init__(**kwargs)
        self.heads = int(heads)
        self.kept = [int(h) for h in kept]

    def _runs(self):
        runs = []  # [first, last + 1) of consecutive kept heads
        for h in self.kept:
            if runs and runs[-1][1] == h:
                runs[-1][1] = h + 1
            else:
                runs.append([h, h + 1])
        return runs

    def call(self, inputs):
        hd = inputs.shape[-1] // self.heads
        parts = [inputs[..., a * hd:b * hd] for a, b in self._runs()]
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape).as_list()
        shape[-1] = shape[-1] // self.heads * len(self.kept)
        return tf.TensorShape(shape)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "heads": self.heads, "kept": self.kept}


class ReshapeAs(keras.layers.Layer):
    """Weightless reshape of `x` to the shape of `ref` (inputs [x, ref]), e.g. attention output
    [B, HW, heads, C/heads] back to the feature map [B, H, W, C] when H, W are dynamic."""

    def call(self, inputs):
        x, ref = inputs
        return tf.reshape(x, _dynamic_shape(ref))

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def get_prunable_weights(self):
        return []


CUSTOM_OBJECTS.update({
    "GlobalTokens": GlobalTokens, "HardSigmoid": HardSigmoid, "HardSwish": HardSwish,
    "DynamicReLU": DynamicReLU, "ChannelShuffle": ChannelShuffle, "GroupSplit": GroupSplit,
    "ChannelRepeat": ChannelRepeat, "ReshapeAs": ReshapeAs, "HeadBlocks": HeadBlocks,
    "HeadDiagonal": HeadDiagonal, "SelectHeads": SelectHeads,
})

FAMILY = Family(
    "mobile_former",
    structured_pruning=True,
    quantize={
        "GlobalTokens": qat.output("learned tokens broadcast to the batch: tokens stay float, "
                                   "output quantized"),
        "HardSigmoid": qat.output("relu6(x+3)/6: output quantized"),
        "HardSwish": qat.output("x*relu6(x+3)/6: output quantized"),
        "DynamicReLU": qat.output("max of two products: output quantized"),
        "ChannelShuffle": qat.noop("moves values"),
        "GroupSplit": qat.noop("channel split: moves values"),
        "ChannelRepeat": qat.noop("repeats channels (a one-hot 1x1 conv, exact in int8): "
                                  "moves values"),
        "ReshapeAs": qat.noop("reshape: moves values"),
        "HeadBlocks": qat.noop("per-head copies with other heads' channels zeroed: moves values"),
        "HeadDiagonal": qat.noop("picks each channel from its head's block: moves values"),
        "SelectHeads": qat.noop("slices the kept heads' channels: moves values"),
    },
)


# === Building blocks ==========================================================================


def _dense(units, name, activation=None):
    """nn.Linear as initialised by the reference (`normal(0, 0.01)`, zero bias)."""
    return keras.layers.Dense(
        units, activation=activation, name=name,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
    )


def _conv_init(kernel, out_channels):
    """The reference's conv init: normal(0, sqrt(2 / (k*k*out_channels))) (fan-out He)."""
    return keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / (kernel * kernel * out_channels)))


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=name)


def pointwise_conv_bn(x, filters: int, *, groups: int = 1, name: str):
    """1x1 conv (no bias, optionally grouped) + BN. Grouped: GroupSplit -> per-group Conv2D ->
    Concatenate (group i maps input channels [i*Cin/g, (i+1)*Cin/g) to outputs
    [i*F/g, (i+1)*F/g), as PyTorch's `groups=g`)."""
    if groups == 1:
        x = keras.layers.Conv2D(filters, 1, use_bias=False, name=name,
                                kernel_initializer=_conv_init(1, filters))(x)
    else:
        if x.shape[-1] % groups or filters % groups:
            raise ValueError(
                f"{name}: {x.shape[-1]} -> {filters} channels not divisible by {groups} groups")
        parts = GroupSplit(groups, name=f"{name}_split")(x)
        parts = [
            keras.layers.Conv2D(filters // groups, 1, use_bias=False, name=f"{name}_g{i}",
                                kernel_initializer=_conv_init(1, filters))(p)  # one per layer
            for i, p in enumerate(parts)
        ]
        x = keras.layers.Concatenate(axis=-1, name=f"{name}_concat")(parts)
    return _bn(f"{name}_bn")(x)


def depthwise_conv_bn(x, *, multiplier: int = 1, stride: int = 1, name: str):
    """3x3 depthwise conv (no bias), channel multiplier `multiplier` (the reference's expanding
    `Conv2d(C, C*m, 3, groups=C)`: output channel c*m + j comes from input c, as in Keras), + BN.
    Stride 2 uses symmetric zero padding + 'valid' (PyTorch padding=1).

    At stride 1 an expanding conv is `ChannelRepeat(m)` + a depthwise conv over C*m channels
    (kernel (3, 3, C*m, 1), the reference's (C*m, 1, 3, 3) weight transposed): XNNPACK runs a
    channel multiplier as a grouped convolution of C groups of 1 input channel, several times
    slower than a 1x1 GEMM plus a plain depthwise conv. Measured, one thread: 56x56x24, m = 4:
    fp32 0.26 -> 0.13 ms, int8 0.30 -> 0.11 ms; mobile_former_294m fp32 7.4 -> 6.8 ms, int8
    6.5 -> 4.7 ms. At stride 2 the repeat would run at the input resolution, 4x the outputs, and
    does not pay (fp32 0.07 -> 0.15 ms at 56x56x24, m = 6), so the multiplier stays there.
    """
    init = _conv_init(3, x.shape[-1] * multiplier)
    if stride == 1 and multiplier > 1:
        x = ChannelRepeat(multiplier, name=f"{name}_repeat")(x)
        multiplier = 1
    if stride == 1:
        padding = "same"
    else:
        x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid"
    x = keras.layers.DepthwiseConv2D(3, strides=stride, padding=padding,
                                     depth_multiplier=multiplier, use_bias=False,
                                     depthwise_initializer=init, name=name)(x)
    return _bn(f"{name}_bn")(x)


def _flat_map(x, name: str):
    """Feature map [B, H, W, C] -> [B, HW, C] (a free reshape)."""
    return keras.layers.Reshape((-1, x.shape[-1]), name=name)(x)


def _logits_by_head(attn, *, heads: int, tokens: int, name: str):
    """Bridge logits [B, HW, heads*T] -> [B, heads, T, HW] (a reshape, then a transpose).

    The converter folds a transpose that directly follows a matmul into it by swapping the
    operands, which would make the feature map the packed right-hand operand; the reshape in
    between keeps them apart (`test_bridges_never_pack_the_feature_map`)."""
    attn = keras.layers.Reshape((-1, heads, tokens), name=f"{name}_qk_heads")(attn)
    return keras.layers.Permute((2, 3, 1), name=f"{name}_qk_t")(attn)


def mobile_to_former(x, z, *, heads: int = BRIDGE_HEADS, name: str):
    """Mobile->Former bridge (`Local2Global`, gbr_type 'attn', dynamic gate, post-LN).

    q = Dense(C)(z); keys = values = the raw feature map (no projection), both split into
    `heads` contiguous channel groups; softmax over the HW positions with scale (C/heads)^-0.5;
    the [T, C] result is gated by 2*h-sigmoid(Dense(C)(z)), projected by Dense(d) and added to z,
    then LayerNorm. Returns the new tokens [B, T, d].

    All heads at once, the map used as it lies (the costs of this bridge under XNNPACK were
    splitting the map into heads, a transpose, and packing it as the right-hand operand of two
    dynamic matmuls): logits [HW, heads*T] = map·HeadBlocks(q)ᵀ, softmax over HW on their
    [heads, T, HW] transpose (long rows, which XNNPACK's SOFTMAX runs well), then
    [C, heads*T] = mapᵀ·attnᵀ (XNNPACK transposes the left operand; the small attn is the
    packed one, in the transposed layout that its fast packing kernels take), whose
    head-diagonal blocks (`HeadDiagonal`) are the output. The zero blocks double this bridge's
    (small) MACs.
    """
    channels, dim = x.shape[-1], z.shape[-1]
    head_dim = channels // heads
    q = _dense(channels, f"{name}_q")(z)
    q = Scale(head_dim**-0.5, name=f"{name}_scale")(q)
    q = HeadBlocks(heads, name=f"{name}_q_heads")(q)  # [B, h*T, C]
    kv = _flat_map(x, f"{name}_kv_flat")  # [B, HW, C]
    tokens = z.shape[-2]
    attn = MatMul(transpose_b=True, name=f"{name}_qk")([kv, q])  # [B, HW, h*T]
    attn = _logits_by_head(attn, heads=heads, tokens=tokens, name=name)  # [B, h, T, HW]
    attn = keras.layers.Softmax(axis=-1, name=f"{name}_softmax")(attn)  # over HW
    attn = keras.layers.Reshape((heads * tokens, -1), name=f"{name}_attn_flat")(attn)
    out = MatMul(transpose_a=True, transpose_b=True, name=f"{name}_av")([kv, attn])  # [B, C, h*T]
    out = keras.layers.Permute((2, 1), name=f"{name}_av_t")(out)  # [B, h*T, C]
    out = HeadDiagonal(heads, name=f"{name}_merge")(out)  # [B, T, C]
    gate = _dense(channels, f"{name}_gate")(z)
    gate = HardSigmoid(scale=2.0, name=f"{name}_gate_act")(gate)
    out = keras.layers.Multiply(name=f"{name}_gated")([out, gate])
    out = _dense(dim, f"{name}_proj")(out)
    z = keras.layers.Add(name=f"{name}_add")([z, out])
    return keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{name}_ln")(z)


def former(z, *, heads: int = FORMER_HEADS, kept=None, ffn: int | None = None, name: str):
    """The Former (`GlobalBlock`, 'attn', FFN, post-LN) on the tokens [B, T, d].

    q = Dense(d)(z); keys = values = z (no projections), `heads` heads of d/heads, scale
    (d/heads)^-0.5; z = LN(z + Dense(d)(attn_out)); z = LN(z + FFN(z)),
    FFN = Dense(ffn) -> GELU (exact) -> Dense(d), ffn = FFN_RATIO * d in the reference.
    `kept`: the heads left by structured pruning (indices of the reference's, default all):
    q and the projection's input shrink to them, and keys and values are their channels of z
    (`SelectHeads`).
    """
    dim = z.shape[-1]
    head_dim = dim // heads
    kept = list(range(heads)) if kept is None else list(kept)
    ffn = ffn or dim * FFN_RATIO
    q = _dense(len(kept) * head_dim, f"{name}_q")(z)
    q = split_heads(q, heads=len(kept), name=f"{name}_q_heads")
    q = Scale(head_dim ** -0.5, name=f"{name}_scale")(q)
    kv = z if len(kept) == heads else SelectHeads(heads, kept, name=f"{name}_kv_select")(z)
    kv = split_heads(kv, heads=len(kept), name=f"{name}_kv_heads")  # [B, h, T, d/h]
    attn = MatMul(transpose_b=True, name=f"{name}_qk")([q, kv])  # [B, h, T, T]
    attn = keras.layers.Softmax(axis=-1, name=f"{name}_softmax")(attn)
    out = MatMul(name=f"{name}_av")([attn, kv])
    out = merge_heads(out, name=f"{name}_merge")
    out = _dense(dim, f"{name}_proj")(out)
    z = keras.layers.Add(name=f"{name}_add1")([z, out])
    z = keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{name}_ln1")(z)
    y = _dense(ffn, f"{name}_ffn_fc1")(z)
    y = keras.layers.Activation("gelu", name=f"{name}_ffn_gelu")(y)
    y = _dense(dim, f"{name}_ffn_fc2")(y)
    z = keras.layers.Add(name=f"{name}_add2")([z, y])
    return keras.layers.LayerNormalization(epsilon=LN_EPS, name=f"{name}_ln2")(z)


def former_to_mobile(x, z, *, heads: int = BRIDGE_HEADS, name: str):
    """Former->Mobile bridge (`Global2Local`, 'attn'): x + attention(x -> tokens).

    queries = the raw feature map (no projection), keys = Dense(C)(z), values = Dense(C)(z), all
    split into `heads` contiguous channel groups; softmax over the T tokens with scale
    (C/heads)^-0.5; the [HW, C] result is added to the map (no norm, no output projection).

    All heads at once on the whole map: logits [HW, heads*T] = map·HeadBlocks(k)ᵀ, normalised
    per head over its T tokens by `AxisSoftmax` on their [heads, T, HW] transpose (a SOFTMAX
    over rows of 3-6 tokens is dominated by its per-row cost in XNNPACK, see
    `models.layers.AxisSoftmax`), output [HW, C] = attnᵀ·HeadBlocks(v): the map is neither
    split into heads nor transposed.
    """
    channels = x.shape[-1]
    head_dim = channels // heads
    tokens = z.shape[-2]
    q = _flat_map(x, f"{name}_q_flat")  # [B, HW, C]
    k = _dense(channels, f"{name}_k")(z)
    k = Scale(head_dim**-0.5, name=f"{name}_scale")(k)
    k = HeadBlocks(heads, name=f"{name}_k_heads")(k)  # [B, h*T, C]
    v = _dense(channels, f"{name}_v")(z)
    v = HeadBlocks(heads, name=f"{name}_v_heads")(v)  # [B, h*T, C]
    attn = MatMul(transpose_b=True, name=f"{name}_qk")([q, k])  # [B, HW, h*T]
    attn = _logits_by_head(attn, heads=heads, tokens=tokens, name=name)  # [B, h, T, HW]
    attn = AxisSoftmax(axis=-2, name=f"{name}_softmax")(attn)  # over each head's T tokens
    attn = keras.layers.Reshape((heads * tokens, -1), name=f"{name}_attn_flat")(attn)
    out = MatMul(transpose_a=True, name=f"{name}_av")([attn, v])  # [B, HW, C]
    out = ReshapeAs(name=f"{name}_to_map")([out, x])
    return keras.layers.Add(name=f"{name}_add")([x, out])


def dynamic_relu(x, token0, *, reduction: int = HYPER_REDUCTION, name: str, act_name: str):
    """Dynamic ReLU with its own hyper MLP (`HyperFunc` + `DyReLU(num_func=2)`).

    a = h-sigmoid(Dense(2C)(ReLU(Dense(d/reduction)(token0)))); y = max(a1*x, a2*x) with
    a1 = 2(a[:C] - 0.5) + 1, a2 = 2(a[C:] - 0.5). `name` prefixes the MLP (`..._hyper1`),
    `act_name` names the activation layer.
    """
    channels, dim = x.shape[-1], token0.shape[-1]
    a = _dense(dim // reduction, f"{name}_fc1", activation="relu")(token0)
    a = _dense(2 * channels, f"{name}_fc2")(a)
    a = HardSigmoid(name=f"{name}_hsig")(a)
    return DynamicReLU(scale=2.0, name=act_name)([x, a])


def _conv_alone(x, out: int, *, stride: int, e1: int, groups: int, name: str):
    """The conv-only block (e1 == 1 or e2 == 0): dw 3x3 xe1 + BN + ReLU6 [+ shuffle] -> 1x1 + BN."""
    inp = x.shape[-1]
    y = depthwise_conv_bn(x, multiplier=e1, stride=stride, name=f"{name}_conv1")
    y = keras.layers.ReLU(max_value=6.0, name=f"{name}_relu6")(y)
    if groups > 1:
        y = ChannelShuffle(inp, name=f"{name}_conv1_shuffle")(y)
    y = pointwise_conv_bn(y, out, groups=groups, name=f"{name}_conv2")
    if stride == 1 and inp == out:
        y = keras.layers.Add(name=f"{name}_add")([y, x])
    return y


def _has_former(e1: int, e2: int) -> bool:
    """Whether a row's block updates the tokens (Mobile->Former + Former); else conv only."""
    return not (e1 == 1 or e2 == 0)


def _row_widths(kind: str, e1: int, e2: int, groups: int) -> tuple[bool, bool]:
    """(has an `mlp` width: its Former's FFN, has an `expand` width: an ungrouped DnaBlock's
    hidden channels) of one row, in `default_widths` order."""
    former = _has_former(e1, e2)
    return former, former and kind == "D" and groups == 1


def _token_update(x, z, *, ffn: int | None, heads, name: str):
    z = mobile_to_former(x, z, name=f"{name}_l2g")
    z = former(z, kept=heads, ffn=ffn, name=f"{name}_former")
    return z, TakeToken(0, name=f"{name}_token0")(z)


def dna_block(x, z, *, out: int, stride: int, e1: int, e2: int, groups: int = 1,
              hidden: int | None = None, ffn: int | None = None, heads=None, name: str):
    """`DnaBlock` (gbr_before_skip=False): tokens <- Former(Mobile->Former(x, tokens));
    1x1 (`hidden` = x e1 in the reference, grouped) + BN [+ shuffle] -> DyReLU(hyper1) ->
    dw 3x3 (stride) + BN -> DyReLU(hyper2) -> 1x1 (grouped) + BN [+ shuffle]; + x if stride 1
    and same width; then Former->Mobile. `ffn`, `heads`: the Former's FFN width and kept heads
    (`former`). Returns (x, z)."""
    inp = x.shape[-1]
    if not _has_former(e1, e2):
        return _conv_alone(x, out, stride=stride, e1=e1, groups=groups, name=name), z
    z, t0 = _token_update(x, z, ffn=ffn, heads=heads, name=name)
    hidden = hidden or round(inp * e1)
    y = pointwise_conv_bn(x, hidden, groups=groups, name=f"{name}_conv1")
    if groups > 1:
        y = ChannelShuffle(groups, name=f"{name}_conv1_shuffle")(y)
    y = dynamic_relu(y, t0, name=f"{name}_hyper1", act_name=f"{name}_dyrelu1")
    y = depthwise_conv_bn(y, stride=stride, name=f"{name}_conv2")
    y = dynamic_relu(y, t0, name=f"{name}_hyper2", act_name=f"{name}_dyrelu2")
    y = pointwise_conv_bn(y, out, groups=groups, name=f"{name}_conv3")
    if groups > 1:
        y = ChannelShuffle(groups, name=f"{name}_conv3_shuffle")(y)
    if stride == 1 and inp == out:
        y = keras.layers.Add(name=f"{name}_add")([y, x])
    return former_to_mobile(y, z, name=f"{name}_g2l"), z


def dna_block3(x, z, *, out: int, stride: int, e1: int, e2: int, groups: int = 1,
               hidden: int | None = None, ffn: int | None = None, heads=None, name: str):
    """`DnaBlock3`: tokens <- Former(Mobile->Former(x, tokens));
    dw 3x3 xe1 (stride) + BN [+ shuffle(in)] -> DyReLU(hyper1) -> 1x1 -> out + BN (= skip) ->
    dw 3x3 xe2 + BN [+ shuffle(out)] -> DyReLU(hyper3) -> 1x1 -> out + BN, + skip;
    then Former->Mobile, then + x if stride 1 and same width. e2 == 0: conv-only block.
    `ffn`, `heads`: as in `dna_block`."""
    inp = x.shape[-1]
    if not _has_former(e1, e2):
        return _conv_alone(x, out, stride=stride, e1=e1, groups=groups, name=name), z
    # `hidden` is not used: this block's expansions are depthwise channel multipliers, which
    # cannot lose single channels (compress/structured.py)
    z, t0 = _token_update(x, z, ffn=ffn, heads=heads, name=name)
    y = depthwise_conv_bn(x, multiplier=e1, stride=stride, name=f"{name}_conv1")
    if groups > 1:
        y = ChannelShuffle(inp, name=f"{name}_conv1_shuffle")(y)
    y = dynamic_relu(y, t0, name=f"{name}_hyper1", act_name=f"{name}_dyrelu1")
    skip = pointwise_conv_bn(y, out, groups=groups, name=f"{name}_conv2")
    y = depthwise_conv_bn(skip, multiplier=e2, name=f"{name}_conv3")
    if groups > 1:
        y = ChannelShuffle(out, name=f"{name}_conv3_shuffle")(y)
    y = dynamic_relu(y, t0, name=f"{name}_hyper3", act_name=f"{name}_dyrelu3")
    y = pointwise_conv_bn(y, out, groups=groups, name=f"{name}_conv4")
    y = keras.layers.Add(name=f"{name}_add_inner")([y, skip])
    y = former_to_mobile(y, z, name=f"{name}_g2l")
    if stride == 1 and inp == out:
        y = keras.layers.Add(name=f"{name}_add")([y, x])
    return y, z


# === Model ====================================================================================

# Rows: (block type, e1, out channels, stride, e2), from the reference's `dna_blocks` tables
# (all rows have n = 1).
_ROWS_26_52 = [
    ("3", 3, 12, 2, 0), ("D", 3, 12, 1, 3), ("3", 6, 24, 2, 4), ("D", 3, 24, 1, 3),
    ("3", 6, 48, 2, 4), ("D", 4, 48, 1, 4), ("D", 6, 64, 1, 4), ("3", 6, 96, 2, 4),
    ("D", 6, 96, 1, 4),
]
_CFGS = {
    "26m": dict(rows=_ROWS_26_52, stem=8, groups=4, tokens=3, token_dim=128, num_features=1024),
    "52m": dict(rows=_ROWS_26_52, stem=8, groups=1, tokens=3, token_dim=128, num_features=1024),
    "96m": dict(rows=[
        ("3", 2, 12, 1, 0), ("3", 6, 16, 2, 4), ("3", 6, 32, 2, 4), ("D", 3, 32, 1, 3),
        ("3", 6, 64, 2, 4), ("D", 4, 64, 1, 4), ("D", 6, 88, 1, 4), ("3", 6, 128, 2, 4),
        ("D", 6, 128, 1, 4),
    ], stem=12, groups=1, tokens=4, token_dim=128, num_features=1280),
    "151m": dict(rows=[
        ("3", 2, 12, 1, 0), ("3", 6, 16, 2, 4), ("D", 3, 16, 1, 3), ("3", 6, 32, 2, 4),
        ("D", 3, 32, 1, 3), ("3", 6, 64, 2, 4), ("D", 4, 64, 1, 4), ("D", 6, 88, 1, 4),
        ("D", 6, 88, 1, 4), ("3", 6, 128, 2, 4), ("D", 6, 128, 1, 4), ("D", 6, 128, 1, 4),
    ], stem=12, groups=1, tokens=6, token_dim=192, num_features=1280),
    "214m": dict(rows=[
        ("3", 2, 12, 1, 0), ("3", 6, 20, 2, 4), ("D", 3, 20, 1, 4), ("3", 6, 40, 2, 4),
        ("D", 4, 40, 1, 4), ("3", 6, 80, 2, 4), ("D", 4, 80, 1, 4), ("D", 6, 112, 1, 4),
        ("D", 6, 112, 1, 4), ("3", 6, 160, 2, 4), ("D", 6, 160, 1, 4), ("D", 6, 160, 1, 4),
    ], stem=12, groups=1, tokens=6, token_dim=192, num_features=1600),
    "294m": dict(rows=[
        ("3", 2, 16, 1, 0), ("3", 6, 24, 2, 4), ("D", 4, 24, 1, 4), ("3", 6, 48, 2, 4),
        ("D", 4, 48, 1, 4), ("3", 6, 96, 2, 4), ("D", 4, 96, 1, 4), ("D", 6, 128, 1, 4),
        ("D", 6, 128, 1, 4), ("3", 6, 192, 2, 4), ("D", 6, 192, 1, 4), ("D", 6, 192, 1, 4),
    ], stem=16, groups=1, tokens=6, token_dim=192, num_features=1920),
    "508m": dict(rows=[
        ("3", 2, 24, 1, 0), ("3", 6, 40, 2, 4), ("D", 3, 40, 1, 3), ("3", 6, 72, 2, 4),
        ("D", 3, 72, 1, 3), ("3", 6, 128, 2, 4), ("D", 4, 128, 1, 4), ("D", 6, 176, 1, 4),
        ("D", 6, 176, 1, 4), ("3", 6, 240, 2, 4), ("D", 6, 240, 1, 4), ("D", 6, 240, 1, 4),
    ], stem=24, groups=1, tokens=6, token_dim=192, num_features=1920),
}


def default_widths(*, rows, stem: int, groups: int, token_dim: int, **_) -> dict:
    """The reference's widths in the `widths=` format of `build_mobile_former`, in block order:
    `expand`, the hidden channels of every `DnaBlock` with ungrouped 1x1 convs (the 1x1
    expansion, its dynamic ReLUs and depthwise conv; DnaBlock3's expansions are depthwise
    channel multipliers, and 26M's grouped convs interleave their channels, so neither is
    listed), `mlp`, the FFN width of every Former, and `heads`, the heads every Former keeps:
    a list of indices into its FORMER_HEADS heads, not a count, because its keys and values
    are those heads' channels of the token stream (`former`)."""
    expand, mlp, heads, inp = [], [], [], stem
    for kind, e1, out, _, e2 in rows:
        has_mlp, has_expand = _row_widths(kind, e1, e2, groups)
        if has_mlp:
            mlp.append(token_dim * FFN_RATIO)
            heads.append(list(range(FORMER_HEADS)))
        if has_expand:
            expand.append(round(inp * e1))
        inp = out
    return dict(expand=expand, mlp=mlp, heads=heads)


def build_mobile_former(
    *,
    rows,
    stem: int,
    groups: int,
    tokens: int,
    token_dim: int,
    num_features: int,
    num_classes: int = 1000,
    input_size: int | None = None,
    dropout: float = 0.0,
    widths: dict | None = None,
    name: str = "mobile_former",
) -> keras.Model:
    """A Mobile-Former classifier (logits). Input: RGB images [B, S, S, 3], S a multiple of 32,
    normalised as the caller's preprocessing decides (the reference uses ImageNet mean/std).

    widths: a thinner model of the same layout and layer names (structured pruning,
      `compress/structured.py`): a dict of lists as `default_widths` returns, a key left out
      keeping the reference's widths. None builds the reference model.
    """
    w = resolve_widths(widths, default_widths(rows=rows, stem=stem, groups=groups,
                                              token_dim=token_dim), name)
    expand, mlp, heads = iter(w["expand"]), iter(w["mlp"]), iter(w["heads"])
    shape = (input_size, input_size, 3) if input_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    z = GlobalTokens(tokens, token_dim, name="tokens")(inputs)
    x = keras.layers.ZeroPadding2D(1, name="stem_pad")(inputs)
    x = keras.layers.Conv2D(stem, 3, strides=2, padding="valid", use_bias=False,
                            kernel_initializer=_conv_init(3, stem), name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name="stem_relu6")(x)
    for i, (kind, e1, out, stride, e2) in enumerate(rows, start=1):
        block = dna_block3 if kind == "3" else dna_block
        has_mlp, has_expand = _row_widths(kind, e1, e2, groups)
        x, z = block(x, z, out=out, stride=stride, e1=e1, e2=e2, groups=groups,
                     hidden=next(expand) if has_expand else None,
                     ffn=next(mlp) if has_mlp else None,
                     heads=next(heads) if has_mlp else None, name=f"block{i}")
    z = mobile_to_former(x, z, name="final_l2g")

    # MergeClassifier (last_act 'relu', cls_token_num 1)
    if groups > 1:
        x = ChannelShuffle(groups, name="head_shuffle")(x)
    x = pointwise_conv_bn(x, x.shape[-1] * LAST_EXP, groups=groups, name="head_conv")
    x = keras.layers.ReLU(max_value=6.0, name="head_relu6")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = HardSwish(name="head_pool_hswish")(x)
    t0 = TakeToken(0, name="head_token0")(z)
    x = keras.layers.Concatenate(axis=-1, name="head_concat")([x, t0])
    x = _dense(num_features, "head_fc")(x)
    x = _bn("head_fc_bn")(x)
    x = HardSwish(name="head_fc_hswish")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_drop")(x)
    x = _dense(num_classes, "head")(x)
    return keras.Model(inputs, x, name=name)


def _builder(variant, num_classes, input_size, overrides):
    return build_mobile_former(num_classes=num_classes, input_size=input_size,
                               name=f"mobile_former_{variant}", **{**_CFGS[variant], **overrides})


_REG = dict(default_size=224, size_divisor=32, family="mobile_former")


@register_model(params=3_232_788, **_REG)
def mobile_former_26m(*, num_classes=1000, input_size=None, **overrides):
    return _builder("26m", num_classes, input_size, overrides)


@register_model(params=3_469_092, **_REG)
def mobile_former_52m(*, num_classes=1000, input_size=None, **overrides):
    return _builder("52m", num_classes, input_size, overrides)


@register_model(params=4_585_252, **_REG)
def mobile_former_96m(*, num_classes=1000, input_size=None, **overrides):
    return _builder("96m", num_classes, input_size, overrides)


@register_model(params=7_595_828, **_REG)
def mobile_former_151m(*, num_classes=1000, input_size=None, **overrides):
    return _builder("151m", num_classes, input_size, overrides)


@register_model(params=9_425_920, **_REG)
def mobile_former_214m(*, num_classes=1000, input_size=None, **overrides):
    return _builder("214m", num_classes, input_size, overrides)


@register_model(params=11_422_648, **_REG)
def mobile_former_294m(*, num_classes=1000, input_size=None, **overrides):
    return _builder("294m", num_classes, input_size, overrides)


@register_model(params=13_976_976, **_REG)
def mobile_former_508m(*, num_classes=1000, input_size=None, **overrides):
    return _builder("508m", num_classes, input_size, overrides)
