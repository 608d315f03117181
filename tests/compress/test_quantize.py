"""QAT: a layer class in no QAT table is refused by name (that every registered model's classes are
covered is checked on the models tests/models/test_all_models.py builds), apply_qat works,
a QAT model trains, reloads from h5 with identical outputs, converts with a representative set
to a file with no float CONV_2D/FULLY_CONNECTED/BATCH_MATMUL, and a pruned model stays sparse
through prune-preserving QAT."""

import collections

import numpy as np
import pytest
from tests.helpers import fixed_tiny_vit, glue_layers_convnet

import models
from compress import prune as P
from compress import quantize as Q
from models.compat import keras, tf


def _size(name):
    info = models.get_model_info(name)
    return info.default_size if info.fixed_size else max(64, 2 * info.size_divisor)


class Mystery(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


def test_unknown_layer_class_raises_naming_layer_and_class():
    inputs = keras.Input((4,))
    out = keras.layers.Dense(2, name="fc")(Mystery(name="odd_one")(inputs))
    with pytest.raises(ValueError, match=r"odd_one.*Mystery.*no QAT spec"):
        Q.apply_qat(keras.Model(inputs, out))


def kernel(qat, name):
    """The float kernel variable of a QAT-wrapped layer (its `kernel` attribute is quantized)."""
    return [w for w in qat.get_layer("quant_" + name).trainable_weights
            if w.name.endswith("kernel:0")][0].numpy()


def _fit(model, x, *, lr=1e-3, steps=1):
    classes = model.output_shape[-1]
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(x, np.arange(len(x)) % classes, batch_size=len(x) // steps, epochs=1,
                     verbose=0)
    return hist.history["loss"][-1]


@pytest.fixture(scope="module")
def trained_qat_vit():
    x = np.random.default_rng(1).random((8, 32, 32, 3), dtype=np.float32)
    model = fixed_tiny_vit()
    qat = Q.apply_qat(model, input_range=(0.0, 1.0))
    before = kernel(qat, "head").copy()
    loss = _fit(qat, x)
    return model, qat, x, before, loss


def test_qat_trains_one_step(trained_qat_vit):
    model, qat, x, before, loss = trained_qat_vit
    assert np.isfinite(loss)
    wrappers = [l for l in qat.layers if type(l).__name__ == "QuantizeWrapperV2"]
    assert len(wrappers) == len([l for l in model.layers if not isinstance(
        l, keras.layers.InputLayer)])
    # the trainable float weights moved (the wrapper's `kernel` attribute is the quantized one)
    assert np.abs(kernel(qat, "head") - before).max() > 0


def test_qat_starts_from_the_trained_weights(images):
    model = fixed_tiny_vit()
    x = images(4, 32)
    qat = Q.apply_qat(model, input_range=(0.0, 1.0))
    for name in ("patch_embed", "block0_attn_q", "head"):
        np.testing.assert_array_equal(kernel(qat, name), model.get_layer(name).kernel.numpy())
    a, b = qat(x).numpy(), model(x).numpy()
    cos = np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos > 0.8, cos  # 8-bit rounding and tfmot's initial [-6, 6] activation ranges


def test_conv_bn_folds_and_bn_follows_conv(images):
    qat = Q.apply_qat(glue_layers_convnet(), input_range=(0.0, 1.0))
    for conv in ("stem_conv", "b1_dw", "b1_pw"):
        act = qat.get_layer("quant_" + conv).layer.activation
        # tfmot's Conv+BN transform: no fake-quant between the conv and its BN
        assert type(getattr(act, "activation", act)).__name__ == "NoOpActivation", conv
    kinds = Q.coverage(glue_layers_convnet())
    assert {k for k, _ in kinds["LayerScale"]} == {"weights"}
    assert {k for k, _ in kinds["LayerNormalization"]} == {"output"}


def test_h5_save_and_reload(trained_qat_vit, tmp_path):
    _, qat, x, _, _ = trained_qat_vit
    path = tmp_path / "qat.weights.h5"
    Q.save_qat_weights(qat, str(path))
    rebuilt = Q.load_qat_weights(Q.apply_qat(fixed_tiny_vit(seed=7)), str(path))
    np.testing.assert_array_equal(rebuilt(x).numpy(), qat(x).numpy())
    with pytest.raises(ValueError, match="keras"):
        Q.save_qat_weights(qat, str(tmp_path / "qat.keras"))


def _float_heavy_ops(tflite_bytes):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite_bytes)
    interp.allocate_tensors()
    dtype = {t["index"]: t["dtype"] for t in interp.get_tensor_details()}
    counts = collections.Counter()
    heavy = collections.Counter()
    for op in interp._get_ops_details():
        if op["op_name"] == "DELEGATE":
            continue
        counts[op["op_name"]] += 1
        ios = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL") \
                and any(dtype[i] == np.float32 for i in ios):
            heavy[op["op_name"]] += 1
    return counts, heavy, interp


@pytest.mark.parametrize("builder, size", [(fixed_tiny_vit, 32), (glue_layers_convnet, 16)],
                         ids=["vit", "convnet"])
def test_qat_int8_conversion_has_no_float_heavy_ops(builder, size, images):
    x = images(8, size)
    qat = Q.apply_qat(builder(), input_range=(0.0, 1.0))
    _fit(qat, x)
    conv = tf.lite.TFLiteConverter.from_keras_model(qat)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[i:i + 1]] for i in range(len(x)))
    counts, heavy, interp = _float_heavy_ops(conv.convert())
    assert not heavy, heavy
    assert counts["FULLY_CONNECTED"] + counts["CONV_2D"] > 0, counts
    # the int8 file computes what the QAT model computes (up to int8 rounding)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    got = []
    for i in range(len(x)):
        interp.set_tensor(inp["index"], x[i:i + 1])
        interp.invoke()
        got.append(interp.get_tensor(out["index"])[0])
    got, want = np.array(got).ravel(), qat(x).numpy().ravel()
    cos = got @ want / np.linalg.norm(got) / np.linalg.norm(want)
    print(f"cosine(int8 file, QAT model) = {cos:.4f}")
    assert cos > 0.9, cos  # random weights, one QAT step: loose


def test_prune_preserving_qat_keeps_the_zeros(images):
    x = images(8, 16)
    pruned = P.apply_pruning(glue_layers_convnet(), target_sparsity=0.5, schedule="constant",
                             begin_step=0, end_step=-1, frequency=1)
    pruned.compile(keras.optimizers.SGD(0.01),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, np.arange(8) % 4, batch_size=4, epochs=1, verbose=0,
               callbacks=P.pruning_callbacks())
    stripped = P.strip(pruned)
    zeros = {n: stripped.get_layer(n).kernel.numpy() == 0 for n in ("b1_pw", "tok_fc", "head")}
    assert all(z.mean() >= 0.49 for z in zeros.values())

    kept = Q.apply_qat(stripped, preserve_sparsity=True, input_range=(0.0, 1.0))
    plain = Q.apply_qat(stripped, input_range=(0.0, 1.0))
    for qat in (kept, plain):
        _fit(qat, x, lr=0.05, steps=2)
    for name, z in zeros.items():
        assert np.all(kernel(kept, name)[z] == 0), name
    # without the scheme the zeros are trained away: the check above can fail
    assert any(np.any(kernel(plain, name)[z] != 0) for name, z in zeros.items())


def test_apply_qat_on_a_registered_model():
    keras.backend.clear_session()
    model = models.create_model("vit_tiny_patch16", num_classes=10, input_size=64, depth=1)
    qat = Q.apply_qat(model)
    assert qat.output_shape == (None, 10)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_models())
def test_apply_qat_on_every_registered_model(name):
    keras.backend.clear_session()
    size = _size(name)
    qat = Q.apply_qat(models.create_model(name, num_classes=10, input_size=size))
    out = qat(np.random.default_rng(0).random((1, size, size, 3), dtype=np.float32))
    assert out.shape == (1, 10) and np.isfinite(out.numpy()).all()


def test_logits_reaching_a_softmax_through_a_permute_stay_float():
    """Mobile-Former's Former->Mobile logits go through a Permute to an AxisSoftmax: no fake
    quantizer on them, as for the logits that feed a Softmax directly."""
    from models.layers import AxisSoftmax, MatMul

    a, b = keras.Input((2, 12, 4)), keras.Input((2, 3, 4))
    logits = MatMul(transpose_b=True, name="qk")([a, b])  # [B, 2, 12, 3]
    direct = keras.layers.Softmax(name="sm")(MatMul(transpose_b=True, name="qk2")([a, b]))
    t = keras.layers.Permute((1, 3, 2), name="t")(logits)
    attn = AxisSoftmax(axis=-2, name="axis_sm")(t)
    model = keras.Model([a, b], [attn, direct, MatMul(name="other")([direct, b])])
    kinds = {n: Q.spec_for(model.get_layer(n)).kind for n in ("qk", "qk2", "axis_sm", "other")}
    assert kinds == {"qk": "noop", "qk2": "noop", "axis_sm": "noop", "other": "output"}
