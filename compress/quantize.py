"""Quantization-aware training (QAT) of the registered models with tfmot 0.8.1.

Method: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (arXiv:1712.05877): fake-quantize weights (per-channel for
convs, symmetric) and activations (moving-average ranges) during training, so that the int8
TFLite file matches what the model learned.

Why not `tfmot.quantization.keras.quantize_model(model)`: tfmot's default 8-bit registry knows
no LayerNormalization, Subtract, Multiply, Average, MultiHeadAttention or custom layer and raises
at the first one ("Layer ... is not supported"). So every layer class is looked up in one
table, `QUANTIZE` (class name -> `Spec`), and annotated by a `clone_function`; then
`quantize_apply` runs inside `quantize_scope()`. Layer classes deliberately left in float go in
`KEEP_FLOAT` (class name -> reason; annotated with a no-op config). A class in neither table
raises, naming the layer and its class. Custom layers bring their own entries: the shared ones in
`models.layers.QUANTIZE`, a family's in the `quantize=` of its `FAMILY` (`models.qat.Spec`).

Spec kinds:
  * ``default``: tfmot's own config (Conv2D/DepthwiseConv2D/Dense weights + activation, Add,
    Concatenate, pooling, ReLU, glue such as Reshape/Permute with no quantizer, ...);
  * ``output``: only the layer output is fake-quantized (a moving-average quantizer); weights,
    if any, stay float in QAT and are quantized by the converter;
  * ``weights``: the named weights (symmetric, per-tensor) and, optionally, the output;
  * ``noop``: nothing (layers that only move values, whose input is already quantized);
  * ``by_layer``: a function picks one of the above per layer (BatchNormalization folds into a
    preceding linear Conv2D/DepthwiseConv2D/Dense through tfmot's default annotation, a lone BN
    gets an output quantizer; Activation uses tfmot's config for the activations it knows).

`apply_qat(model, preserve_sparsity=True)` uses tfmot's prune-preserving scheme
(`Default8BitPrunePreserveQuantizeScheme`, Conv2D and Dense kernels): a stripped pruned model
stays sparse through QAT. Its masks are computed from the weights when the QAT model is built,
so build it from the pruned float weights (see `rebuild_qat(float_weights=...)`).

Saving: QAT models do not reload from `.keras` (tfmot 0.8.1: "Layer 'quantize_layer' expected 5
variables, but received 3"); save weights as `.h5` or a TF checkpoint and rebuild with
`rebuild_qat` (create_model + apply_qat + load_weights).

Convert with `tf.lite.TFLiteConverter.from_keras_model(qat)`, `optimizations=[DEFAULT]` *and* a
`representative_dataset`: without it LayerNorm pieces, FULLY_CONNECTED on rank-3 inputs and
some BATCH_MATMULs stay float (a BATCH_MATMUL whose output is not fake-quantized, e.g. q·kᵀ
followed by its scale).
"""

from __future__ import annotations

import contextlib

from models.compat import keras, tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tfmot)
import tensorflow_model_optimization as tfmot  # noqa: E402

from models import layers, registry  # noqa: E402
from models.layers import CUSTOM_OBJECTS  # noqa: E402
from models.qat import DEFAULT, Spec, by_layer, noop, output, weights  # noqa: E402,F401

_qk = tfmot.quantization.keras
_quantizers = _qk.quantizers


# --------------------------------------------------------------------------------------------
# Quantize configs.


def _activation_quantizer():
    return _quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                              narrow_range=False)


def _weight_quantizer():
    return _quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=True,
                                          narrow_range=True)


class NoOpQuantizeConfig(_qk.QuantizeConfig):
    """Quantizes nothing: the layer runs in float inside the QAT graph."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


class OutputQuantizeConfig(NoOpQuantizeConfig):
    """Fake-quantizes the layer's output only (moving-average 8-bit, asymmetric)."""

    def get_output_quantizers(self, layer):
        return [_activation_quantizer()]


class WeightsOutputQuantizeConfig(_qk.QuantizeConfig):
    """Fake-quantizes the named weights (8-bit symmetric per-tensor) and, optionally, the output."""

    def __init__(self, weight_attrs=(), quantize_output: bool = True):
        self.weight_attrs = tuple(weight_attrs)
        self.quantize_output = bool(quantize_output)

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, a), _weight_quantizer()) for a in self.weight_attrs]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != len(self.weight_attrs):
            raise ValueError(f"{layer.name}: expected {len(self.weight_attrs)} quantized weights, "
                             f"got {len(quantize_weights)}")
        for attr, w in zip(self.weight_attrs, quantize_weights):
            setattr(layer, attr, w)

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [_activation_quantizer()] if self.quantize_output else []

    def get_config(self):
        return {"weight_attrs": list(self.weight_attrs), "quantize_output": self.quantize_output}


# --------------------------------------------------------------------------------------------
# The tables.


_FOLDABLE = ("Conv2D", "DepthwiseConv2D", "Dense")


def _inbound_layers(layer) -> list:
    nodes = getattr(layer, "_inbound_nodes", None) or []
    if not nodes:
        return []
    return list(tf.nest.flatten(nodes[0].inbound_layers))


def _pick_batchnorm(layer) -> Spec:
    inbound = _inbound_layers(layer)
    if (len(inbound) == 1 and type(inbound[0]).__name__ in _FOLDABLE
            and keras.activations.serialize(inbound[0].activation) == "linear"):
        return DEFAULT  # tfmot's Conv/Dense + BN transform: no fake quant between them; folds
    return output("BatchNormalization not after a linear conv/dense: output quantizer, "
                  "the converter folds it into MUL/ADD")


_TFMOT_ACTIVATIONS = ("relu", "relu6", "swish", "gelu", "linear", "softmax", "sigmoid", "tanh")


def _pick_activation(layer) -> Spec:
    name = getattr(layer.activation, "__name__", None)
    if name in _TFMOT_ACTIVATIONS:
        return DEFAULT
    return output(f"activation {name!r} is refused by tfmot's activation config: output quantizer")


# Stock layer classes: class name -> Spec.
_STOCK: dict[str, Spec] = {
    # Stock layers that tfmot's default 8-bit registry quantizes.
    "Conv2D": Spec("default", "kernel per-channel + output (or folded with a following BN)"),
    "DepthwiseConv2D": Spec("default", "depthwise kernel per-channel + output (or BN fold)"),
    "Dense": Spec("default", "kernel per-tensor + output"),
    "BatchNormalization": by_layer(_pick_batchnorm, "default annotation so Conv/Dense+BN fold; "
                                   "a lone BN gets an output quantizer"),
    "Activation": by_layer(_pick_activation, "tfmot config for relu/relu6/swish/gelu (output) "
                           "and linear/softmax/sigmoid/tanh (none); others: output quantizer"),
    "ReLU": DEFAULT,
    "LeakyReLU": DEFAULT,
    "Add": DEFAULT,
    "Concatenate": DEFAULT,
    "AveragePooling2D": DEFAULT,
    "GlobalAveragePooling1D": DEFAULT,
    "GlobalAveragePooling2D": DEFAULT,
    "MaxPooling2D": Spec("default", "no quantizer (max keeps the input's scale)"),
    "UpSampling2D": DEFAULT,
    "Reshape": Spec("default", "no quantizer (moves values)"),
    "Permute": Spec("default", "no quantizer (moves values)"),
    "Flatten": Spec("default", "no quantizer (moves values)"),
    "ZeroPadding2D": Spec("default", "no quantizer (moves values)"),
    "Cropping2D": Spec("default", "no quantizer (moves values)"),
    "Dropout": Spec("default", "no quantizer (identity at inference)"),
    "SpatialDropout2D": Spec("default", "no quantizer (identity at inference)"),
    # Stock layers tfmot 0.8.1 does not know.
    "LayerNormalization": output("tfmot has no LN config; gamma/beta stay float in QAT, the "
                                 "converter calibrates the LN pieces"),
    "Softmax": noop("kept float on purpose: XNNPACK has no int8 SOFTMAX, so an int8 "
                    "softmax splits the graph; the export calibrates its output for attn·v"),
    "Subtract": output("element-wise, not in tfmot's registry"),
    "Multiply": output("element-wise, not in tfmot's registry"),
    "Average": output("element-wise, not in tfmot's registry"),
    "Maximum": output("element-wise, not in tfmot's registry"),
    "Minimum": output("element-wise, not in tfmot's registry"),
    "Identity": noop("identity"),
    "Resize": noop("resize: int8 RESIZE keeps its input's scale"),
}


def _custom_layer_specs() -> dict[str, Spec]:
    """The Specs of the custom layers: `models.layers.QUANTIZE` and each family's `quantize`."""
    out = dict(layers.QUANTIZE)
    for name in registry.list_families():
        for cls, spec in registry.get_family(name).quantize.items():
            if cls in out and out[cls] != spec:
                raise ValueError(f"family {name}: layer class {cls} already has another QAT spec")
            out[cls] = spec
    return out


# Every layer class a registered model may use: class name -> Spec.
QUANTIZE: dict[str, Spec] = {**_STOCK, **_custom_layer_specs()}

# Layer classes deliberately left float (a NoOp config), with the reason.
KEEP_FLOAT: dict[str, str] = {
    "MultiHeadAttention": "tfmot 0.8.1 cannot give keras MultiHeadAttention any quantizer "
                          "(compute_output_shape TypeError); our models use explicit attention",
    "EinsumDense": "not in tfmot's registry (used only inside keras MultiHeadAttention)",
}

# Classes that cannot go through clone_model/QAT at all: raise with the fix.
_REFUSED = {
    "TFOpLambda": "a raw tf.* call on a Keras tensor in model code; put it in a custom layer",
    "SlicingOpLambda": "a raw tensor slice in model code; put it in a custom layer",
    "Lambda": "a Lambda layer; write a small custom layer with get_config instead",
    "Functional": "a nested model; build the model flat",
    "Sequential": "a nested model; build the model flat",
}


_SOFTMAX_CLASSES = ("Softmax", "AxisSoftmax")
_MOVES_VALUES = ("Permute", "Reshape")


def _feeds_only_softmax(layer) -> bool:
    """True when every path out of `layer` reaches a softmax, through value-moving layers only."""
    outbound = [n.outbound_layer for n in getattr(layer, "_outbound_nodes", [])]
    return bool(outbound) and all(
        type(o).__name__ in _SOFTMAX_CLASSES
        or (type(o).__name__ in _MOVES_VALUES and _feeds_only_softmax(o)) for o in outbound)


def spec_for(layer) -> Spec:
    """The Spec of `layer` (by_layer resolved); raises for classes in no table."""
    cls = type(layer).__name__
    if cls in QUANTIZE and QUANTIZE[cls].kind == "output" or cls == "MatMul":
        if _feeds_only_softmax(layer):
            # Attention logits (q·kᵀ, + bias) stay float: an int8 logit tensor makes the
            # converter emit an int8 SOFTMAX, which XNNPACK does not take; measured on
            # mobilevit_xxs: 10 partitions with it, 1 without.
            return noop("attention logits feeding the float softmax")
    if cls in QUANTIZE:
        spec = QUANTIZE[cls]
        return spec.pick(layer) if spec.kind == "by_layer" else spec
    if cls in KEEP_FLOAT:
        return Spec("keep_float", KEEP_FLOAT[cls])
    if cls in _REFUSED:
        raise ValueError(f"layer {layer.name!r} ({cls}) cannot be quantized: {_REFUSED[cls]}")
    raise ValueError(
        f"layer {layer.name!r} has class {cls}, which has no QAT spec; give it one in the "
        "quantize= of its module's FAMILY (or compress.quantize.KEEP_FLOAT to keep it float)")


def quantize_config_for(layer):
    """The QuantizeConfig for `layer`, or None for tfmot's default annotation."""
    spec = spec_for(layer)
    if spec.kind == "default":
        return None
    if spec.kind == "output":
        return OutputQuantizeConfig()
    if spec.kind == "weights":
        return WeightsOutputQuantizeConfig(spec.weights, quantize_output=spec.output)
    return NoOpQuantizeConfig()  # noop, keep_float


def coverage(model) -> dict:
    """{layer class: (kind, why)} for every (non-input) layer class of `model`; raises for an
    unknown class."""
    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        spec = spec_for(layer)
        out.setdefault(type(layer).__name__, set()).add((spec.kind, spec.why))
    return out


QUANTIZE_CONFIGS = {
    "NoOpQuantizeConfig": NoOpQuantizeConfig,
    "OutputQuantizeConfig": OutputQuantizeConfig,
    "WeightsOutputQuantizeConfig": WeightsOutputQuantizeConfig,
}


def qat_scope_objects() -> dict:
    """Every custom layer (read at call time: family modules add theirs on import) and config."""
    return {**CUSTOM_OBJECTS, **QUANTIZE_CONFIGS}


class _ScopeView(dict):
    """`QAT_SCOPE` that always reflects the current CUSTOM_OBJECTS."""

    def _fresh(self):
        self.clear()
        self.update(qat_scope_objects())
        return self


QAT_SCOPE = _ScopeView(qat_scope_objects())


@contextlib.contextmanager
def quantize_scope():
    """tfmot's quantize_scope with every custom layer and config of the project."""
    with _qk.quantize_scope(QAT_SCOPE._fresh()):
        yield


# --------------------------------------------------------------------------------------------
# Applying QAT.


def _strip_if_pruned(model):
    from compress import prune

    return prune.strip(model) if prune.is_pruning_wrapped(model) else model


def apply_qat(model: keras.Model, *, preserve_sparsity: bool = False,
              input_range: tuple[float, float] | None = None) -> keras.Model:
    """A QAT copy of `model` (its trained weights, fake-quant wrappers on every layer).

    Weight ranges are set from the weights (`init_weight_ranges`); activation ranges start at
    tfmot's [-6, 6] and the input range at tfmot's [0, 0] (every input quantizes to 0 until
    the first training step) unless `input_range` gives it. Train at least one step (or pass
    `input_range`) before evaluating a fresh QAT model.

    Args:
      preserve_sparsity: use tfmot's prune-preserving scheme: zero Conv2D/Dense kernel weights
        stay zero through QAT (a pruning-wrapped model is stripped first).
    Raises: ValueError naming the layer and its class if a class is in neither QUANTIZE nor
      KEEP_FLOAT.
    """
    model = _strip_if_pruned(model)
    configs = {}
    for layer in model.layers:  # check every layer before any cloning
        if not isinstance(layer, keras.layers.InputLayer):
            configs[layer.name] = quantize_config_for(layer)

    def annotate(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        return _qk.quantize_annotate_layer(fresh, quantize_config=configs[layer.name])

    with quantize_scope():
        annotated = keras.models.clone_model(model, clone_function=annotate)
        by_name = {l.layer.name if hasattr(l, "quantize_config") else l.name: l
                   for l in annotated.layers}
        for layer in model.layers:
            if layer.weights:
                target = by_name[layer.name]
                (target.layer if hasattr(target, "quantize_config") else target).set_weights(
                    layer.get_weights())
        if preserve_sparsity:
            scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
            qat = _qk.quantize_apply(annotated, scheme=scheme)
        else:
            qat = _qk.quantize_apply(annotated)
    init_weight_ranges(qat)
    if input_range is not None:
        set_input_range(qat, *input_range)
    return qat


def set_input_range(qat: keras.Model, lo: float, hi: float) -> None:
    """Set the range of the input QuantizeLayer(s) (tfmot starts it at [0, 0])."""
    if not lo <= 0.0 <= hi or lo == hi:
        raise ValueError(f"input_range must contain 0 and not be empty, got ({lo}, {hi})")
    found = False
    for layer in qat.layers:
        if type(layer).__name__ == "QuantizeLayer":
            for v in layer.weights:
                short = v.name.split("/")[-1].split(":")[0]
                if short.endswith("_min"):
                    v.assign(tf.fill(v.shape, float(lo)))
                    found = True
                elif short.endswith("_max"):
                    v.assign(tf.fill(v.shape, float(hi)))
    if not found:
        raise ValueError("the model has no input QuantizeLayer with a range")


def init_weight_ranges(qat: keras.Model) -> None:
    """Set every weight quantizer's range from its weight, as one training step would.

    tfmot starts every range at [-6, 6] and a LastValueQuantizer only updates it in training,
    so before the first training step inference rounds most weights (|w| << 6/127) to zero;
    running each weight quantizer once in training mode (no data, no BN statistics touched)
    makes a fresh QAT model's outputs those of the float model up to 8-bit rounding and the
    [-6, 6] activation clip.
    """
    for layer in qat.layers:
        for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
            quantizer(weight, True, weights=qvars)


# --------------------------------------------------------------------------------------------
# Saving and rebuilding.


def save_qat_weights(model: keras.Model, path: str) -> None:
    """Save QAT weights as `.h5` (or a TF checkpoint for any other path without `.keras`)."""
    if str(path).endswith(".keras"):
        raise ValueError(".keras files of QAT models do not reload in tfmot 0.8.1; use .h5 or a "
                         "checkpoint prefix")
    model.save_weights(str(path))


def load_qat_weights(model: keras.Model, path: str) -> keras.Model:
    status = model.load_weights(str(path))
    if status is not None and not str(path).endswith(".h5"):
        status.assert_existing_objects_matched()
    return model


def rebuild_qat(name: str, weights_path: str, *, num_classes: int = 1000,
                input_size: int | None = None, preserve_sparsity: bool = False,
                float_weights: str | None = None, **overrides) -> keras.Model:
    """create_model + (optional float weights) + apply_qat + load the QAT weights.

    `float_weights` (the pre-QAT float weights, e.g. the stripped pruned model's .h5) matters
    for `preserve_sparsity=True` when training goes on: tfmot builds the prune-preserve masks
    from the weights present when `apply_qat` runs, and does not save them.
    """
    import models

    model = models.create_model(name, num_classes=num_classes, input_size=input_size,
                                **overrides)
    if float_weights:
        model.load_weights(str(float_weights))
    qat = apply_qat(model, preserve_sparsity=preserve_sparsity)
    return load_qat_weights(qat, weights_path)
