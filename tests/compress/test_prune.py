"""Pruning: schedules reach their target on the stripped weights, 2:4 groups, trained weights are
kept, stripping keeps outputs, bad settings raise naming the layer and the setting, and a
pruning model trains under a distribution strategy."""

import glob

import numpy as np
import pytest
from tests.helpers import fixed_tiny_vit, glue_layers_convnet

from compress import prune as P
from models.compat import keras, tf


def _fit(model, x, steps, *, lr=0.01, logdir=None, classes=None):
    classes = classes or model.output_shape[-1]
    y = np.arange(len(x)) % classes
    model.compile(keras.optimizers.SGD(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=len(x) // steps, epochs=1, verbose=0,
              callbacks=P.pruning_callbacks(logdir))


def test_zero_sparsity_is_a_no_op(images):
    model = fixed_tiny_vit()
    x = images(4, 32)
    pruned = P.apply_pruning(model, target_sparsity=0.0, schedule="constant", begin_step=0,
                             end_step=-1, frequency=1)
    _fit(pruned, x, 2, lr=0.0)  # masks are computed at each step; lr 0 isolates pruning
    stripped = P.strip(pruned)
    for layer in model.layers:
        for a, b in zip(layer.get_weights(), stripped.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), atol=1e-6)
    assert P.sparsity_report(stripped)["overall"]["zeros"] == 0


def test_pruned_model_keeps_trained_weights(images):
    model = fixed_tiny_vit()
    x = images(4, 32)
    pruned = P.apply_pruning(model, target_sparsity=0.5, begin_step=100, end_step=200)
    assert model is not pruned
    np.testing.assert_allclose(pruned(x).numpy(), model(x).numpy(), atol=1e-6)
    wrapped = [l for l in pruned.layers if isinstance(l, P.PruneWrapper)]
    names = sorted(l.layer.name for l in wrapped)
    # every Dense (attention q/k/v/proj, MLP, head) and the patch-embedding conv
    assert names == sorted(["patch_embed", "block0_attn_q", "block0_attn_k", "block0_attn_v",
                            "block0_attn_proj", "block0_mlp_fc1", "block0_mlp_fc2", "head"])
    np.testing.assert_array_equal(pruned.get_layer("prune_low_magnitude_head").layer.kernel,
                                  model.get_layer("head").kernel)


@pytest.mark.parametrize("schedule", ["polynomial", "constant"])
def test_target_sparsity_is_reached(images, schedule):
    model = fixed_tiny_vit()
    x = images(8, 32)
    pruned = P.apply_pruning(model, target_sparsity=0.6, schedule=schedule, begin_step=0,
                             end_step=3, frequency=1, skip=["patch_embed"])
    _fit(pruned, x, 4)
    report = P.sparsity_report(P.strip(pruned))
    for name, row in report["layers"].items():
        if name == "patch_embed":
            assert row["sparsity"] == 0.0 and row["prunable"]
        else:
            assert row["sparsity"] == pytest.approx(0.6, abs=0.01), name
    overall = report["overall"]
    assert overall["zeros"] / overall["size"] == pytest.approx(overall["sparsity"])
    dense = report["layers"]["patch_embed"]["size"]  # the skipped layer dilutes the overall
    assert overall["sparsity"] == pytest.approx(0.6 * (overall["size"] - dense) / overall["size"],
                                                abs=0.01)


def test_depthwise_stays_dense_and_strip_keeps_outputs(images, tmp_path):
    model = glue_layers_convnet()
    x = images(8, 16)
    pruned = P.apply_pruning(model, target_sparsity=0.5, schedule="constant", begin_step=0,
                             end_step=-1, frequency=1)
    _fit(pruned, x, 2, logdir=str(tmp_path / "tb"))
    stripped = P.strip(pruned)
    assert not P.is_pruning_wrapped(stripped)
    np.testing.assert_allclose(stripped(x).numpy(), pruned(x).numpy(), atol=1e-5)
    report = P.sparsity_report(stripped)["layers"]
    assert report["b1_dw"]["sparsity"] == 0.0 and not report["b1_dw"]["prunable"]
    assert "DepthwiseConv2D" in report["b1_dw"]["note"]
    for name in ("stem_conv", "b1_pw", "tok_fc", "head"):
        assert report[name]["sparsity"] == pytest.approx(0.5, abs=0.02), name
    assert glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)


def _groups_of_n(kernel, n):
    """Groups of n consecutive weights along the input axis (as tfmot's m-by-n pattern)."""
    k = np.asarray(kernel)
    k = np.moveaxis(k, -2, -1)  # input axis last
    return k.reshape(-1, k.shape[-1] // n, n)


def test_two_of_four(images):
    model = glue_layers_convnet()
    x = images(8, 16)
    pruned = P.apply_pruning(model, target_sparsity=0.5, m_by_n=(2, 4), skip=["stem_conv"])
    _fit(pruned, x, 4)
    stripped = P.strip(pruned)
    for name in ("b1_pw", "tok_fc", "head"):
        kernel = stripped.get_layer(name).kernel.numpy()
        nonzeros = np.count_nonzero(_groups_of_n(kernel, 4), axis=-1)
        assert nonzeros.max() <= 2, name
        assert np.mean(kernel == 0) >= 0.5, name
    assert np.count_nonzero(stripped.get_layer("stem_conv").kernel.numpy() == 0) == 0


@pytest.mark.parametrize("kwargs, words", [
    (dict(target_sparsity=1.0), ["target_sparsity"]),
    (dict(target_sparsity=-0.1), ["target_sparsity"]),
    (dict(target_sparsity=0.5, m_by_n=(2, 4)), ["stem_conv", "m_by_n", "multiple of 4"]),
    (dict(target_sparsity=0.5, block_size=(2, 2)), ["stem_conv", "block_size"]),
    (dict(target_sparsity=0.5, m_by_n=(4, 2), skip=["stem_conv"]), ["m_by_n"]),
    (dict(target_sparsity=0.5, schedule="cubic"), ["schedule"]),
    (dict(target_sparsity=0.5, begin_step=10, end_step=5), ["end_step"]),
])
def test_bad_settings_raise(kwargs, words):
    with pytest.raises(ValueError) as err:
        P.apply_pruning(glue_layers_convnet(), **kwargs)
    for word in words:
        assert word in str(err.value)


def test_skip_lets_block_sparsity_through():
    model = glue_layers_convnet()
    pruned = P.apply_pruning(model, target_sparsity=0.5, block_size=(1, 4),
                             skip=["stem_conv", "b1_pw"])
    plan = P.pruning_plan(model, skip=["stem_conv", "b1_pw"])
    assert plan["stem_conv"] == "skip" and plan["tok_fc"] == "prune"
    assert P.is_pruning_wrapped(pruned)


def test_trains_under_a_distribution_strategy(images):
    model = fixed_tiny_vit()
    x = images(8, 32)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        pruned = P.apply_pruning(model, target_sparsity=0.5, schedule="constant", begin_step=0,
                                 end_step=-1, frequency=1)
        pruned.compile(keras.optimizers.SGD(0.01),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, np.arange(8) % 5, batch_size=4, epochs=1, verbose=0,
               callbacks=P.pruning_callbacks())
    assert P.sparsity_report(P.strip(pruned))["layers"]["head"]["sparsity"] == pytest.approx(
        0.5, abs=0.01)
