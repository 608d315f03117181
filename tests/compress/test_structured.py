"""Structured pruning (compress/structured.py): the widths= override, exact weight transfer, the
MAC budget, rebuilding from model.json, importance, and the fast int8 path of a cut model."""

import json

import numpy as np
import pytest

import models
from models import registry
from compress import structured as st
from compress.measure.costs import static_costs
from models.compat import keras, tf

S = 64  # tiny input: the full-width graphs at a few MMACs
# One model of every family structured pruning supports: its smallest, but Mobile-Former's plain
# 52m (26m's grouped 1x1 convs are cut in whole groups, see compress/structured.py).
PRUNABLE = [{"mobile_former": "mobile_former_52m"}.get(f) or
            min(models.list_models(family=f), key=lambda n: models.get_model_info(n).params)
            for f in registry.list_families(structured_pruning=True)]


def perturbed(name, seed=0):
    """A model at S px with BN statistics, BN/LN scales and layer scales away from their init,
    so that every unit contributes differently (random init alone leaves BN at identity)."""
    keras.backend.clear_session()
    model = models.create_model(name, num_classes=10, input_size=S)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            ws = layer.get_weights()
            ws = [w + rng.normal(0, 0.2, w.shape).astype("float32") for w in ws[:3]] + \
                [w * rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in ws[3:]]
            layer.set_weights(ws)
        elif type(layer).__name__ == "LayerScale":
            layer.set_weights([rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32")])
    return model


def rebuild(name):
    return lambda w: models.create_model(name, num_classes=10, input_size=S, widths=w)


@pytest.fixture(scope="module")
def xxs():
    return perturbed("mobilevit_xxs")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((2, S, S, 3)).astype("float32")


@pytest.mark.parametrize("name", PRUNABLE)
def test_default_widths_build_todays_model(name):
    """widths=None and the reference's widths written out build the same layers and weights."""
    keras.backend.clear_session()
    plain = models.create_model(name, num_classes=10, input_size=S)
    groups = st.unit_groups(plain)
    explicit = models.create_model(name, num_classes=10, input_size=S,
                                   widths=st.widths_of(groups))
    assert [l.name for l in plain.layers] == [l.name for l in explicit.layers]
    assert [w.shape for w in plain.weights] == [w.shape for w in explicit.weights]
    assert sum(len(v) for v in st.widths_of(groups).values()) == len(groups)


def test_bad_widths_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"widths\['heads'\] needs 9 entries, got 2"):
        models.create_model("mobilevit_xxs", widths={"heads": [1, 2]})
    with pytest.raises(ValueError, match=r"unknown widths key\(s\) \['depth'\]"):
        models.create_model("efficientformer_l1", widths={"depth": [1]})
    # Mobile-Former's Former heads are the kept heads' indices, not a count
    for bad in (3, [], [2, 1], [0, 0], [0, 4], [True]):
        with pytest.raises(ValueError, match=r"widths\['heads'\] entries must be non-empty "
                                             r"increasing lists of indices from \[0, 1, 2, 3\]"):
            models.create_model("mobile_former_52m", widths={"heads": [bad] + [[0]] * 7})


@pytest.mark.parametrize("name", PRUNABLE)
def test_layer_macs_of_every_family_equal_the_static_cost_counter(name):
    # the MAC budget and results.csv's macs count the same thing (Mobile-Former's ChannelRepeat
    # convs included: without them keep 0.8 gave 0.82 of the counted MACs)
    model = models.create_model(name, num_classes=10, input_size=S)
    assert sum(st.layer_macs(model, S).values()) == static_costs(model, S)["macs"]


def test_layer_macs_add_up_to_the_static_cost_counter(xxs):
    assert sum(st.layer_macs(xxs, S).values()) == static_costs(xxs, S)["macs"]
    dynamic = models.create_model("mobilevit_xxs", num_classes=10)  # (None, None, 3) input
    assert st.layer_macs(dynamic, S) == st.layer_macs(xxs, S)


def test_nothing_removed_gives_identical_logits(xxs, images):
    small, info = st.prune_structured(xxs, rebuild("mobilevit_xxs"), keep=1.0, input_size=S,
                                      importance="magnitude")
    assert info["kept_fraction"] == 1.0
    np.testing.assert_array_equal(small(images).numpy(), xxs(images).numpy())


@pytest.mark.parametrize("name", PRUNABLE)
def test_units_with_zero_outgoing_weights_are_removed_exactly(name, images):
    """Zero the consumer rows of some units of every group; cutting exactly those units leaves
    the logits unchanged, and the Taylor score of those units is zero."""
    model = perturbed(name)
    rng = np.random.default_rng(2)
    groups = st.unit_groups(model)
    kept = {}
    for g in groups:
        drop = rng.choice(g.units, size=max(1, g.units // 4), replace=False)
        kept[g.name] = np.setdiff1d(np.arange(g.units), drop)
        for c in g.consumers:
            layer = model.get_layer(c)
            ws = layer.get_weights()
            per = ws[0].shape[-2] // g.units
            rows = (drop[:, None] * per + np.arange(per)).ravel()
            idx = [slice(None)] * ws[0].ndim
            idx[-2] = rows
            ws[0][tuple(idx)] = 0
            layer.set_weights(ws)
    before = model(images).numpy()
    small = rebuild(name)(st.widths_of(groups, kept))
    st.transfer(model, small, groups, kept)
    np.testing.assert_allclose(small(images).numpy(), before, atol=1e-5, rtol=1e-5)
    assert small.count_params() < model.count_params()

    def loss_fn(x, y):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, model(x, training=False), from_logits=True))

    scores = st.taylor_scores(model, groups, [(images, np.array([1, 2]))], loss_fn)
    for g in groups:
        dropped = np.setdiff1d(np.arange(g.units), kept[g.name])
        assert np.all(scores[g.name][dropped] == 0)
        assert np.any(scores[g.name][kept[g.name]] > 0)


def test_cut_model_fits_the_mac_budget_and_rebuilds_from_model_json(xxs, images, tmp_path):
    keep = 0.7
    small, info = st.prune_structured(xxs, rebuild("mobilevit_xxs"), keep=keep, input_size=S,
                                      importance="magnitude")
    dense, cut = static_costs(xxs, S)["macs"], static_costs(small, S)["macs"]
    assert cut == info["macs"] and dense == info["dense_macs"]
    assert keep - 0.05 < cut / dense <= keep  # at most one chunk of 8 channels under
    for key, full in st.widths_of(st.unit_groups(xxs)).items():
        assert all(n <= f for n, f in zip(info["widths"][key], full))
        if key != "heads":
            assert all(n % 8 == 0 for n in info["widths"][key])
    # model.json carries the widths; create_model rebuilds the model without this module
    spec = json.loads(json.dumps({"name": "mobilevit_xxs",
                                  "overrides": {"widths": info["widths"]}}))
    small.save_weights(str(tmp_path / "w.h5"))
    again = models.create_model(spec["name"], num_classes=10, **spec["overrides"])
    again.load_weights(str(tmp_path / "w.h5"))
    np.testing.assert_allclose(again(images).numpy(), small(images).numpy(), atol=1e-6)


def test_a_cut_former_cut_again_names_the_reference_heads(images):
    """A Former's widths entry lists the reference's heads it keeps; cutting a cut model again
    composes the indices, and the result equals a direct cut to those heads."""
    dense = perturbed("mobile_former_52m")
    groups = st.unit_groups(dense)
    first = {g.name: np.arange(g.units) for g in groups}
    first["heads[0]"], first["heads[3]"] = np.array([0, 2, 3]), np.array([1])
    once = rebuild("mobile_former_52m")(st.widths_of(groups, first))
    st.transfer(dense, once, groups, first)
    assert type(once.get_layer("block2_former_kv_select")).__name__ == "SelectHeads"
    assert "block3_former_kv_select" not in {l.name for l in once.layers}  # all 4 heads kept

    again_groups = st.unit_groups(once)
    assert [g.ids for g in again_groups if g.key == "heads"][:4] == [[0, 2, 3], [0, 1, 2, 3],
                                                                     [0, 1, 2, 3], [1]]
    second = {g.name: np.arange(g.units) for g in again_groups}
    second["heads[0]"] = np.array([1, 2])  # of [0, 2, 3]: reference heads 2 and 3
    widths = st.widths_of(again_groups, second)
    assert widths["heads"][0] == [2, 3] and widths["heads"][3] == [1]
    twice = rebuild("mobile_former_52m")(widths)
    st.transfer(once, twice, again_groups, second)

    direct = {**first, "heads[0]": np.array([2, 3])}
    straight = rebuild("mobile_former_52m")(widths)
    st.transfer(dense, straight, groups, direct)
    np.testing.assert_array_equal(twice(images).numpy(), straight(images).numpy())
    assert not np.allclose(twice(images).numpy(), once(images).numpy())


def test_taylor_removes_the_units_the_loss_does_not_need(images):
    """Units whose output the loss ignores (zero outgoing weights) go before any other."""
    model = perturbed("mobilevit_xxs", seed=3)
    g = [g for g in st.unit_groups(model) if g.key == "mlp"][0]
    layer = model.get_layer(g.consumers[0])
    ws = layer.get_weights()
    ws[0][:16] = 0  # 16 of 128 hidden units of the first MLP
    layer.set_weights(ws)

    def loss_fn(x, y):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, model(x, training=False), from_logits=True))

    _, info = st.prune_structured(model, rebuild("mobilevit_xxs"), keep=0.999, input_size=S,
                                  importance="taylor", batches=[(images, np.array([1, 2]))],
                                  loss_fn=loss_fn)
    assert info["widths"]["mlp"][0] in (112, 120)  # only zero units went


def test_bad_budgets_and_families_are_refused(xxs):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        st.prune_structured(xxs, rebuild("mobilevit_xxs"), keep=0.0, input_size=S,
                            importance="magnitude")
    smallest = st.min_keep(xxs, S)
    with pytest.raises(ValueError, match=r"keep=0.2: out of reach, the smallest model keeps "
                                         f"{smallest:.3f}"):
        st.prune_structured(xxs, rebuild("mobilevit_xxs"), keep=0.2, input_size=S,
                            importance="magnitude")
    with pytest.raises(ValueError, match="structured pruning supports efficientformer_\\*, "
                                         "mobile_former_\\*, mobilevit_\\*; not "
                                         "vit_tiny_patch16"):
        st.check_family("vit_tiny_patch16")


def test_one_plan_cuts_to_several_budgets_and_the_smallest_cut_is_score_free(xxs):
    plan = st.plan(xxs, input_size=S, importance="magnitude")
    big, small = st.widths_for(plan, 0.9), st.widths_for(plan, 0.6)
    assert all(b >= s for k in big for b, s in zip(big[k], small[k])) and big != small
    assert st.widths_for(plan, 1.0) == st.widths_of(plan.groups)
    # every group at its minimum: the widths of the smallest keep, whatever the scores
    smallest = st.widths_for(plan, st.min_keep(xxs, S) + 1e-6)
    assert smallest == st.smallest_widths(xxs)
    other = st.plan(perturbed("mobilevit_xxs", seed=5), input_size=S, importance="magnitude")
    assert st.widths_for(other, st.min_keep(xxs, S) + 1e-6) == smallest


def test_latency_budget_takes_the_largest_probed_keep_that_meets_it():
    def latency(keep):  # a step function of the keep, as real widths are
        calls.append(keep)
        return 10.0 * round(keep * 20) / 20

    calls = []
    keep, ms, trials = st.keep_for_latency(latency, 7.0, lo=0.3, probes=6)
    assert ms <= 7.0 and keep == max(k for k, m in trials if m <= 7.0)
    assert 0.65 <= keep < 0.725 and len(calls) == 8 == len(trials)  # both ends, then 6 halvings
    # the dense model meets it: nothing cut, one probe
    assert st.keep_for_latency(latency, 20.0, lo=0.3)[:2] == (1.0, 10.0)
    with pytest.raises(ValueError, match=r"target_ms=1: out of reach, the smallest model "
                                         r"\(keep 0.300 of the MACs\) runs in 3.00 ms"):
        st.keep_for_latency(latency, 1.0, lo=0.3)
    # noisy timings that break the order: the answer is still a probed keep that met it
    noisy = iter([12.0, 5.0, 8.0, 6.9, 7.5, 6.0, 9.0, 7.1])
    keep, ms, trials = st.keep_for_latency(lambda k: next(noisy), 7.0, lo=0.3, probes=6)
    assert ms <= 7.0 and (keep, ms) in trials and keep > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name,keep", [("mobilevit_xxs", 0.6), ("mobile_former_52m", 0.75)])
def test_int8_export_of_a_cut_model_is_one_xnnpack_partition(name, keep, tmp_path):
    """The cut file takes the dense file's fast path: one partition, the same float ops (none
    in MobileViT; Mobile-Former's stride-2 channel-multiplier depthwise convs stay float)."""
    from compress.tflite.audit import audit_tflite
    from compress.tflite.convert import export_tflite

    dense = perturbed(name)
    small, _ = st.prune_structured(dense, rebuild(name), keep=keep, input_size=S,
                                   importance="magnitude")
    rep = np.random.default_rng(4).random((8, S, S, 3)).astype("float32")
    audits = []
    for tag, model in (("dense", dense), ("cut", small)):
        path = tmp_path / f"{tag}.int8.tflite"
        export_tflite(model, path, fmt="int8", input_size=S, representative=rep)
        audits.append(audit_tflite(str(path)))
    full, cut = audits
    assert cut["partitions"] == 1 and cut["undelegated_ops"] == {}
    assert cut["float_heavy_by_op"] == full["float_heavy_by_op"]
    assert cut["float_heavy_ops"] == (4 if name.startswith("mobile_former") else 0)
    assert cut["size_bytes"] < full["size_bytes"]


@pytest.mark.slow
def test_a_former_head_cut_exports_and_trains_qat_on_the_fast_path(images, tmp_path):
    """Cut heads of every Former (a run of kept heads that is not the first ones, and one with
    a gap, so SelectHeads slices and concatenates): the fp32 file computes the Keras model, and
    the PTQ and the QAT int8 files are one XNNPACK partition with the float ops of the dense
    model's file of the same kind, and smaller."""
    from compress import quantize as Q
    from compress.tflite.audit import audit_tflite, parity
    from compress.tflite.convert import export_tflite

    dense = perturbed("mobile_former_52m")
    groups = st.unit_groups(dense)
    kept = {g.name: np.arange(g.units) for g in groups}
    for g in groups:
        if g.key == "heads":
            kept[g.name] = np.array([0, 2, 3] if g.index % 2 else [1, 2])
    small = rebuild("mobile_former_52m")(st.widths_of(groups, kept))
    st.transfer(dense, small, groups, kept)
    rep = np.random.default_rng(4).random((8, S, S, 3)).astype("float32")
    export_tflite(small, tmp_path / "cut.fp32.tflite", fmt="fp32", input_size=S)
    fp32 = parity(small, str(tmp_path / "cut.fp32.tflite"), rep, delegate="xnnpack")
    assert fp32["rel_l2"] < 1e-4, fp32
    audits = {}
    for tag, model in (("dense", dense), ("cut", small)):
        for mode, m in (("ptq", model), ("qat", Q.apply_qat(model, input_range=(0.0, 1.0)))):
            path = tmp_path / f"{tag}.{mode}.int8.tflite"
            export_tflite(m, path, fmt="int8", input_size=S, representative=rep)
            audits[tag, mode] = audit_tflite(str(path))
    for mode in ("ptq", "qat"):
        cut, full = audits["cut", mode], audits["dense", mode]
        assert cut["partitions"] == 1 and cut["undelegated_ops"] == {}
        assert cut["float_heavy_by_op"] == full["float_heavy_by_op"]
        assert cut["size_bytes"] < full["size_bytes"]
    print({k: (a["partitions"], a["float_heavy_by_op"], a["size_bytes"]) for k, a in audits.items()})
