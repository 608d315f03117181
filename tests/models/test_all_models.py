"""One harness over every registered model (`models.list_models()`): the registry holds the
contract's names, and each model has its exact parameter count, a QAT spec for every layer
class (compress/quantize.py), a finite forward pass of the right shape (at two sizes where it
takes any size), gradients on every trainable weight, a clone and JSON-config round trip, an h5
weights round trip and an fp32 `export_tflite` file that agrees with Keras.

Each model is built once for the whole file: the `model` fixture is module-scoped and every test
takes its name through indirect parametrization, so pytest runs all checks of one model in a row
and drops the model before building the next (one model in memory at a time).

The default tier runs every check but the clone, JSON/h5 round trips and the TFLite export on
every model, and those on the smallest model of each family (`REBUILD_DEFAULT`,
`TFLITE_DEFAULT`); the slow tier (`-m slow`) runs them on the others. A new model or family is
picked up from the registry with no edit here.

Sizes are small so the full-size models stay cheap: 3 x size_divisor (96 px, ViT 48 px) gives odd
final maps (3x3), which takes MobileViT's resize path and EfficientFormer's interpolated
attention-bias tables; the second size, 2 x 4 divisors, is even and not square.
"""

import collections
import gc
import zlib

import numpy as np
import pytest

import models
from models.compat import keras, tf
from models.layers import CUSTOM_OBJECTS

# The public model names users rely on (README.md, "Models"): a contract check that they stay
# registered with their role, not a list of every model (models added later need no entry).
CONTRACT_STUDENTS = [
    "mobilevit_xxs", "mobilevit_xs", "mobilevit_s",
    "mobile_former_26m", "mobile_former_52m", "mobile_former_96m", "mobile_former_151m",
    "mobile_former_214m", "mobile_former_294m", "mobile_former_508m",
    "efficientformer_l1", "efficientformer_l3", "efficientformer_l7",
]
CONTRACT_TEACHERS = ["vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16",
                     "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                     "efficientnet_lite3", "efficientnet_lite4"]

NAMES = models.list_models()
DYNAMIC = [n for n in NAMES if not models.get_model_info(n).fixed_size]
# Export costs 10-200 s a model on a 2-core runner (Mobile-Former's graphs the most): the default
# tier exports the smallest model of each family, the slow tier the others.
SMALLEST = {f: min(models.list_models(family=f), key=lambda n: models.get_model_info(n).params)
            for f in sorted({models.get_model_info(n).family for n in NAMES})}
TFLITE_DEFAULT = tuple(SMALLEST.values())
# Rebuilding a model from its config costs seconds for the large ones (the 7 Mobile-Formers most):
# the default tier round-trips the smallest model of each family and Mobile-Former's plain form
# (52m; 26m is grouped), the slow tier all of them.
REBUILD_DEFAULT = TFLITE_DEFAULT + ("mobile_former_52m",)
TFLITE_TOL = 1e-4  # max |tflite - keras| <= TFLITE_TOL * max(1, max |keras logit|)


def trainable_params(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def small_size(name):
    return 3 * models.get_model_info(name).size_divisor


def images(name, hw=None, n=2):
    hw = hw or (small_size(name),) * 2
    return np.random.default_rng(zlib.crc32(name.encode())).random((n, *hw, 3), "float32")


def randomize_constants(model, seed):
    """Give the constant-initialised tensors (zero biases and heads, unit norms, 1e-5 layer
    scales, BN statistics) random values, so that no piece is an identity or a zero and a
    gradient that does not reach a weight is a graph fault, not an initialisation artefact."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        value = w.numpy()
        if "moving_variance" in w.name:
            w.assign(rng.uniform(0.5, 1.5, value.shape).astype(value.dtype))
        elif value.size and value.std() == 0:
            w.assign((value + rng.normal(0, 0.05, value.shape)).astype(value.dtype))


def build(name):
    """The model as users get it at 1000 classes (its exact parameter count is checked on this
    build): dynamic input where the model takes any size, else fixed at the small size."""
    info = models.get_model_info(name)
    keras.backend.clear_session()
    model = models.create_model(name, input_size=small_size(name) if info.fixed_size else None)
    randomize_constants(model, zlib.crc32(name.encode()))
    return model


Built = collections.namedtuple("Built", "name model")


@pytest.fixture(scope="module")
def built(request):
    """`Built(name, model)` for the parametrized name; module scope: built once per model."""
    entry = Built(request.param, build(request.param))
    yield entry
    del entry
    keras.backend.clear_session()
    gc.collect()


def over(names, slow=()):
    """Indirect parametrization of `built` over `names`; the ones in `slow` are marked slow."""
    params = [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in slow else []) for n in names]
    return pytest.mark.parametrize("built", params, indirect=True)


def test_registry_holds_the_contract_names():
    assert set(CONTRACT_STUDENTS + CONTRACT_TEACHERS) <= set(NAMES)
    for name in CONTRACT_STUDENTS + CONTRACT_TEACHERS:
        role = "teacher" if name in CONTRACT_TEACHERS else "student"
        assert models.get_model_info(name).role == role, name


@over(NAMES)
def test_exact_parameter_count(built):
    assert trainable_params(built.model) == models.get_model_info(built.name).params


@over(NAMES)
def test_every_layer_class_has_a_qat_spec(built):
    """compress.quantize knows every layer class of the model: quantized, or kept float on
    purpose (`coverage` raises, naming layer and class, for a class in neither table)."""
    from compress import quantize as Q

    table = Q.coverage(built.model)
    for layer in built.model.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            cls = type(layer).__name__
            assert cls in Q.QUANTIZE or cls in Q.KEEP_FLOAT, (layer.name, cls)
            assert cls in table


@over(NAMES)
def test_forward_is_finite_with_the_class_logits(built):
    out = built.model(images(built.name), training=False).numpy()
    assert out.shape == (2, 1000) and np.isfinite(out).all()
    assert np.abs(out[0] - out[1]).max() > 0  # the logits depend on the image


@over(DYNAMIC)
def test_second_input_size(built):
    d = models.get_model_info(built.name).size_divisor
    assert built.model.input_shape == (None, None, None, 3)
    out = built.model(images(built.name, (2 * d, 4 * d)), training=False).numpy()
    assert out.shape == (2, 1000) and np.isfinite(out).all()


@over(NAMES)
def test_gradients_reach_every_trainable_weight(built):
    model = built.model
    x = images(built.name)
    labels = np.random.default_rng(0).integers(0, 1000, len(x))
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
    grads = tape.gradient(loss, model.trainable_weights)
    missing = [w.name for w, g in zip(model.trainable_weights, grads) if g is None]
    assert not missing, f"no gradient for {missing}"
    bad = [w.name for w, g in zip(model.trainable_weights, grads)
           if not np.isfinite(g.numpy()).all() or not np.abs(g.numpy()).max() > 0]
    assert not bad, f"zero or non-finite gradient for {bad}"


@over(NAMES, slow=set(NAMES) - set(REBUILD_DEFAULT))
def test_clone_model_keeps_outputs(built):
    """`clone_model` (what pruning and QAT wrap through) rebuilds every layer from its config."""
    model, x = built.model, images(built.name)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(x, training=False).numpy(),
                                  model(x, training=False).numpy())


@over(NAMES, slow=set(NAMES) - set(REBUILD_DEFAULT))
def test_json_config_and_h5_weights_round_trip(built, tmp_path):
    """get_config -> JSON -> from_config of every layer gives the same config; the rebuilt model,
    freshly initialised, gets the outputs back from the h5 weights file (one rebuild serves
    both checks: rebuilding the big models costs seconds)."""
    model, x = built.model, images(built.name)
    path = tmp_path / "weights.h5"
    model.save_weights(path)
    again = keras.models.model_from_json(model.to_json(), custom_objects=CUSTOM_OBJECTS)
    assert again.get_config() == model.get_config()
    ref = model(x, training=False).numpy()
    assert np.abs(again(x, training=False).numpy() - ref).max() > 0  # fresh weights differ
    again.load_weights(path)
    np.testing.assert_array_equal(again(x, training=False).numpy(), ref)


@over(NAMES, slow=set(NAMES) - set(TFLITE_DEFAULT))
def test_fp32_export_matches_keras(built, tmp_path):
    from compress.tflite.audit import parity
    from compress.tflite.convert import export_tflite

    model, size = built.model, small_size(built.name)
    path = tmp_path / f"{built.name}.fp32.tflite"
    export_tflite(model, path, fmt="fp32", input_size=size)
    x = images(built.name)
    ref = model(x, training=False).numpy()
    assert ref.std() > 1e-2  # the comparison is not between near-constant outputs
    result = parity(model, str(path), x, delegate="xnnpack", isolate=False)
    print(f"{built.name} fp32 tflite at {size} px: max|tflite - keras| "
          f"{result['max_abs_diff']:.3g} (max|logit| {np.abs(ref).max():.3g})")
    assert result["max_abs_diff"] <= TFLITE_TOL * max(1.0, float(np.abs(ref).max()))
