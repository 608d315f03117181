"""TFLite export and audit on small stand-in models (conv + explicit attention + LN + GELU/SiLU).

A tiny attention model is trained a few steps on a learnable synthetic task (the class is the
tint of a noise image) so that its outputs are not constant, then exported once in every
format (module fixture); the tests read those files.
"""

import os

import numpy as np
import pytest

import models
from compress import io as io_mod
from compress.measure.costs import static_costs
from compress.tflite import audit as audit_mod
from compress.tflite import fast_int8
from compress.tflite.audit import audit_tflite, parity
from compress.tflite.convert import FORMATS, export_tflite
from compress.tflite.flatbuffer import TFLiteFile
from compress.tflite.interpreter import make_interpreter, run_tflite
from models.compat import keras, tf
from models.layers import MatMul, multi_head_attention

S = 32
CLASSES = 4
HEAVY = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")


def colour_task(n, rng):
    """Noise images [n, S, S, 3] tinted red, green, blue or grey; the label is the tint."""
    y = rng.integers(0, CLASSES, n)
    x = rng.uniform(0.0, 0.6, (n, S, S, 3)).astype("float32")
    tint = np.array([[0.4, 0, 0], [0, 0.4, 0], [0, 0, 0.4], [0.25, 0.25, 0.25]], "float32")
    return x + tint[y][:, None, None, :], y


def stand_in(dim=32, heads=2, depth=1):
    """Conv stem (SiLU) -> tokens -> pre-norm blocks (explicit MHA, GELU MLP) -> GAP -> head."""
    inputs = keras.Input((S, S, 3), name="image")
    x = keras.layers.Conv2D(dim, 4, strides=4, name="stem_conv")(inputs)
    x = keras.layers.Activation("swish", name="stem_act")(x)
    x = keras.layers.Reshape((-1, dim), name="stem_tokens")(x)
    for b in range(depth):
        p = f"block{b}"
        y = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{p}_ln1")(x)
        y = multi_head_attention(y, dim=dim, heads=heads, name=f"{p}_attn")
        x = keras.layers.Add(name=f"{p}_add1")([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{p}_ln2")(x)
        y = keras.layers.Dense(2 * dim, name=f"{p}_mlp_fc1")(y)
        y = keras.layers.Activation("gelu", name=f"{p}_mlp_gelu")(y)
        y = keras.layers.Dense(dim, name=f"{p}_mlp_fc2")(y)
        x = keras.layers.Add(name=f"{p}_add2")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
    x = keras.layers.Dense(CLASSES, name="head")(x)
    return keras.Model(inputs, x, name="stand_in")


def prune_copy(model, fraction=0.75):
    """A copy whose Conv2D/Dense kernels have their smallest `fraction` set to zero."""
    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    for layer in pruned.layers:
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            w = layer.get_weights()
            k = w[0]
            k[np.abs(k) < np.quantile(np.abs(k), fraction)] = 0.0
            layer.set_weights([k, *w[1:]])
    return pruned


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = colour_task(384, rng)
    model = stand_in()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    xv, yv = colour_task(64, np.random.default_rng(1))
    acc = float(np.mean(model.predict(xv, verbose=0).argmax(-1) == yv))
    return dict(model=model, calib=x[:32], x_val=xv, y_val=yv, acc=acc)


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    """Every format of the trained stand-in (sparse formats of its 75 %-pruned copy)."""
    d = tmp_path_factory.mktemp("export")
    model, calib = trained["model"], trained["calib"]
    pruned = prune_copy(model)
    out = {}
    for fmt in FORMATS:
        src = pruned if fmt.endswith("_sparse") else model
        out[fmt] = export_tflite(src, d / f"stand_in.{fmt}.tflite", fmt=fmt, input_size=S,
                                 representative=calib)
    out["int8_plain"] = export_tflite(model, d / "stand_in.int8_plain.tflite", fmt="int8",
                                      input_size=S, representative=calib,
                                      xnnpack_friendly=False)
    out["_pruned"] = pruned
    return out


@pytest.fixture(scope="module")
def audits(files):
    return {k: audit_tflite(v["path"]) for k, v in files.items() if not k.startswith("_")}


def test_stand_in_learned_the_task(trained):
    assert trained["acc"] >= 0.9  # outputs are not constant: agreement below means something


@pytest.mark.parametrize("fmt", [*FORMATS, "int8_plain"])
def test_every_format_has_builtin_ops_only_and_a_pinned_input(fmt, files, audits):
    a = audits[fmt]
    assert files[fmt]["size_bytes"] == os.path.getsize(files[fmt]["path"]) == a["size_bytes"]
    assert 0 < files[fmt]["gzip_bytes"] < files[fmt]["size_bytes"]
    assert a["flex_ops"] == 0 and a["custom_ops"] == {}
    assert a["input_signature"] == [1, S, S, 3] and not a["dynamic_input"]
    assert a["dynamic_shape_ops"] == 0
    assert "SPLIT_V" not in a["ops"]


def test_fp32_matches_keras(trained, files):
    p = parity(trained["model"], files["fp32"]["path"], trained["x_val"])
    assert p["max_abs_diff"] <= 1e-4
    assert p["top1_agreement"] == 1.0


def test_fp16_smaller_than_fp32_and_drq_smaller_still(files):
    assert files["fp16"]["size_bytes"] < files["fp32"]["size_bytes"]
    assert files["drq"]["size_bytes"] < files["fp16"]["size_bytes"]


@pytest.mark.parametrize("fmt", ["int8", "int8_plain"])
def test_int8_has_no_float_heavy_ops(fmt, audits):
    a = audits[fmt]
    assert a["float_heavy_ops"] == 0
    for op in HEAVY:
        assert set(a["ops_by_dtype"].get(op, {})) <= {"INT8"}
    assert a["ops_by_dtype"]["FULLY_CONNECTED"] == {"INT8": 7}  # q k v proj fc1 fc2 head


def test_float_files_count_their_heavy_ops_as_float(audits):
    # stem conv + 7 FC (q, k, v, proj, fc1, fc2, head) + 2 BMM
    assert audits["fp32"]["float_heavy_ops"] == sum(audits["fp32"]["ops"].get(o, 0) for o in HEAVY)
    assert audits["fp32"]["float_heavy_ops"] == 10


def test_xnnpack_friendly_int8_is_one_partition(audits, files):
    plain, fast = audits["int8_plain"], audits["int8"]
    # plain full int8: LN pieces, SOFTMAX, GELU and BATCH_MATMUL (RHS zero point != 0) fall out
    assert plain["partitions"] > 1
    assert {"SOFTMAX", "BATCH_MATMUL"} <= set(plain["undelegated_ops"])
    assert fast["partitions"] == 1 and fast["undelegated_ops"] == {}
    assert files["int8"]["partitions"] == 1  # export's own probe agrees with the audit
    # the int8 BATCH_MATMULs stay int8, with a symmetric right-hand input
    f = TFLiteFile(files["int8"]["path"])
    bmm = [op for op in f.ops if op.type == "BATCH_MATMUL"]
    assert len(bmm) == 2
    for op in bmm:
        rhs = f.tensors[op.inputs[1]]
        assert rhs.dtype == "INT8" and int(rhs.zero_point[0]) == 0
    assert fast["ops_by_dtype"]["SOFTMAX"] == {"FLOAT32": 1}
    assert set(fast["ops_by_dtype"]["RSQRT"]) == {"FLOAT32"}


def test_xnnpack_friendly_int8_agrees_with_keras(trained, files):
    fast = parity(trained["model"], files["int8"]["path"], trained["x_val"])
    plain = parity(trained["model"], files["int8_plain"]["path"], trained["x_val"])
    assert fast["top1_agreement"] >= 0.95
    # keeping LN/softmax/GELU in float is not less accurate than the plain int8 file
    assert fast["max_abs_diff"] <= plain["max_abs_diff"] * 1.5 + 1e-3


def test_float_bmm_variant_is_one_partition_too(trained, tmp_path):
    meta = export_tflite(trained["model"], tmp_path / "m.tflite", fmt="int8", input_size=S,
                         representative=trained["calib"], symmetric_bmm=False)
    a = audit_tflite(meta["path"])
    assert a["partitions"] == 1
    assert a["ops_by_dtype"]["BATCH_MATMUL"] == {"FLOAT32": 2}
    assert meta["bmm_rhs_symmetric"] == 0


def test_sparse_formats(files, audits, trained):
    dense, sparse, sparse8 = audits["fp32"], audits["fp32_sparse"], audits["int8_sparse"]
    assert sparse["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert sparse["sparse_tensors"] > 0 and "DENSIFY" in sparse["ops"]
    assert sparse["size_bytes"] < 0.75 * dense["size_bytes"]  # same architecture, unpruned
    assert dense["sparsity"] < 0.01
    assert sparse8["sparsity"] == pytest.approx(0.75, abs=0.02)
    # sparse int8 fails to prepare under XNNPACK (STACK §2d): reported, and the fallback runs it
    assert sparse8["runnable"] == {"xnnpack": False, "none": True}
    assert sparse8["delegate"] == "none" and "xnnpack" in sparse8["errors"]
    assert sparse8["partitions"] == 0
    p = parity(files["_pruned"], files["int8_sparse"]["path"], trained["x_val"][:16])
    assert p["delegate"] == "none" and p["top1_agreement"] >= 0.9


def test_int16x8_is_audited_without_crashing(audits):
    a = audits["int16x8"]
    assert set(a["ops_by_dtype"]["FULLY_CONNECTED"]) == {"INT16"}
    assert set(a["runnable"]) == {"xnnpack", "none"}
    # XNNPACK has no int16 kernels: nothing is delegated even when the file runs
    if a["runnable"]["xnnpack"]:
        assert a["undelegated_ops"].get("FULLY_CONNECTED", 0) > 0
    else:
        assert a["errors"]["xnnpack"]


def test_formats_needing_calibration_refuse_without_it(trained, tmp_path):
    for fmt in ("int8", "int16x8", "int8_sparse"):
        with pytest.raises(ValueError, match="representative"):
            export_tflite(trained["model"], tmp_path / "x.tflite", fmt=fmt, input_size=S)
    with pytest.raises(ValueError, match="fmt"):
        export_tflite(trained["model"], tmp_path / "x.tflite", fmt="int4", input_size=S)
    assert not (tmp_path / "x.tflite").exists()


def test_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "m.fp32.tflite"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        export_tflite(handmade(), target, fmt="fp32", input_size=8)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp32.tflite"]


# -- audit on a handmade model -----------------------------------------------------------------


def handmade():
    """Conv2D 3x3 (4 ch, half the kernel zero) -> DW 3x3 -> Flatten -> Dense(5) -> Softmax."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(5, name="fc")(x)
    x = keras.layers.Softmax(name="softmax")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    conv = model.get_layer("conv")
    k = rng.normal(size=(3, 3, 3, 4)).astype("float32")
    k.reshape(-1)[::2] = 0.0  # 54 of 108 zero
    conv.set_weights([k, np.zeros(4, "float32")])
    fc = model.get_layer("fc")
    w = rng.normal(size=(64, 5)).astype("float32")
    w[:8] = 0.0  # 40 of 320 zero
    fc.set_weights([w, np.zeros(5, "float32")])
    return model


def test_audit_counts_on_a_handmade_model(tmp_path):
    model = handmade()
    rep = np.random.default_rng(0).uniform(0, 1, (8, 8, 8, 3)).astype("float32")
    fp32 = audit_tflite(export_tflite(model, tmp_path / "h.tflite", fmt="fp32",
                                      input_size=8)["path"])
    assert fp32["ops"] == {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1,
                           "RESHAPE": 1, "SOFTMAX": 1}
    assert fp32["num_ops"] == 5 and fp32["float_heavy_ops"] == 3
    assert fp32["float_heavy_by_op"] == {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1,
                                         "FULLY_CONNECTED": 1}
    assert fp32["partitions"] == 1 and fp32["undelegated_ops"] == {}
    # prunable weights: conv 108 (54 zero) + fc 320 (40 zero); the depthwise kernel is not counted
    assert fp32["sparsity_weights"] == 108 + 320
    assert fp32["sparsity"] == pytest.approx((54 + 40) / (108 + 320))
    int8 = audit_tflite(export_tflite(model, tmp_path / "h8.tflite", fmt="int8", input_size=8,
                                      representative=rep, xnnpack_friendly=False)["path"])
    assert int8["ops_by_dtype"]["QUANTIZE"] == {"INT8": 1}
    assert int8["ops_by_dtype"]["DEQUANTIZE"] == {"FLOAT32": 1}
    assert int8["ops_by_dtype"]["SOFTMAX"] == {"INT8": 1}
    assert int8["float_heavy_ops"] == 0 and int8["quantized"]
    assert int8["undelegated_ops"] == {"SOFTMAX": 1}  # XNNPACK softmax is float only


def test_audit_counts_flex_ops(tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([1, 3, 3], tf.float32)])
    def det(x):
        return tf.linalg.det(x)  # MatrixDeterminant has no builtin kernel

    conv = tf.lite.TFLiteConverter.from_concrete_functions([det.get_concrete_function()], det)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                      tf.lite.OpsSet.SELECT_TF_OPS]
    path = tmp_path / "flex.tflite"
    path.write_bytes(conv.convert())
    a = audit_tflite(path)
    assert a["flex_ops"] == 1 and list(a["custom_ops"]) == ["FlexMatrixDeterminant"]


def test_make_interpreter_resizes_a_dynamic_input(tmp_path):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    fn = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec([1, None, None, 3])])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    path = tmp_path / "dyn.tflite"
    path.write_bytes(conv.convert())
    with pytest.raises(ValueError, match="input_shape"):
        make_interpreter(path, 1)
    x = np.random.default_rng(0).uniform(size=(1, 12, 20, 3)).astype("float32")
    for delegate in ("xnnpack", "none"):
        it = make_interpreter(path, 1, delegate, input_shape=x.shape)
        out = run_tflite(it, x)
        np.testing.assert_allclose(out, model.predict(x, verbose=0), atol=1e-5)
    assert audit_tflite(path, input_shape=x.shape)["dynamic_input"]


# -- the ViT teacher, small --------------------------------------------------------------------


def test_small_vit_exports_with_pinned_shape_and_int8_as_delegated_as_fp32(tmp_path):
    keras.utils.set_random_seed(1)
    model = models.create_model("vit_tiny_patch16", num_classes=CLASSES, input_size=None,
                                dim=32, depth=1, heads=2, mlp_dim=64)
    x = np.random.default_rng(2).uniform(0, 1, (24, S, S, 3)).astype("float32")
    fp32 = export_tflite(model, tmp_path / "vit.fp32.tflite", fmt="fp32", input_size=S)
    a = audit_tflite(fp32["path"])
    assert a["input_signature"] == [1, S, S, 3] and a["dynamic_shape_ops"] == 0
    assert a["flex_ops"] == 0
    assert parity(model, fp32["path"], x[:8])["max_abs_diff"] <= 1e-4
    int8 = export_tflite(model, tmp_path / "vit.int8.tflite", fmt="int8", input_size=S,
                         representative=x[:16])
    a8 = audit_tflite(int8["path"])
    assert a8["float_heavy_ops"] == 0
    assert a8["ops_by_dtype"]["GELU"] == {"FLOAT32": 1}
    # the class-token STRIDED_SLICE is outside XNNPACK even in fp32; int8 adds no partition
    assert a8["partitions"] == a["partitions"]
    assert not any(k.endswith(":INT8") for k in a8["undelegated_detail"])


# -- static costs ------------------------------------------------------------------------------


def test_static_costs_match_the_hand_count():
    model = handmade()
    c = static_costs(model, 8)
    # conv: 6*6*4 outputs * 3*3*3; dw: 4*4*4 outputs * 3*3; dense: 64*5
    assert c["macs_by_op"] == {"Conv2D": 6 * 6 * 4 * 27, "DepthwiseConv2D": 4 * 4 * 4 * 9,
                               "MatMul": 64 * 5}
    assert c["macs"] == 3888 + 576 + 320
    assert c["params"] == (108 + 4) + (36 + 4) + (320 + 5) == model.count_params()
    assert c["weight_bytes"] == 4 * c["params"]
    assert c["memory_traffic_bytes"] > c["weight_bytes"] + 4 * (6 * 6 * 4 + 4 * 4 * 4)


def test_static_costs_count_token_dense_and_attention_matmuls():
    inputs = keras.Input((4, 4, 3))
    t = keras.layers.Reshape((16, 3))(inputs)
    q = keras.layers.Dense(8, use_bias=False)(t)  # 16*3*8 = 384
    k = keras.layers.Dense(8, use_bias=False)(t)  # 384
    a = MatMul(transpose_b=True)([q, k])  # 16*16*8 = 2048
    o = MatMul()([a, k])  # 16*16*8 = 2048
    model = keras.Model(inputs, o)
    c = static_costs(model, 4)
    assert c["macs"] == 384 * 2 + 2048 * 2
    assert c["params"] == 48


def test_depthwise_with_a_channel_multiplier_stays_float_in_fast_int8(tmp_path):
    """XNNPACK's int8 depthwise conv with depth_multiplier > 1 is a grouped conv of tiny groups,
    far slower than float: the fast int8 file keeps exactly that layer float; every other
    convolution is int8 and the file is still one partition."""
    inputs = keras.Input((S, S, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem_conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=3, name="dw_mult")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw_plain")(x)
    x = keras.layers.Conv2D(16, 1, name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x))
    assert fast_int8.slow_int8_layers(model) == {"dw_mult": "depthwise depth_multiplier=3"}
    rng = np.random.default_rng(0)
    rep = [rng.uniform(0, 1, (1, S, S, 3)).astype("float32") for _ in range(8)]
    path = tmp_path / "dw.int8.tflite"
    info = export_tflite(model, path, fmt="int8", input_size=S, representative=rep)
    assert info["slow_int8_float_layers"] == 1 and info["partitions"] == 1
    f = TFLiteFile(path.read_bytes())
    dw = [(op, f.tensors[op.outputs[0]]) for op in f.ops if op.type == "DEPTHWISE_CONV_2D"]
    dtypes = {("dw_mult" in t.name): t.dtype for _, t in dw}
    assert dtypes == {True: "FLOAT32", False: "INT8"}
    assert {f.tensors[op.outputs[0]].dtype for op in f.ops if op.type == "CONV_2D"} == {"INT8"}
    x = rng.uniform(0, 1, (4, S, S, 3)).astype("float32")
    assert parity(model, path, x)["max_abs_diff"] < 0.5  # quantized, but the same function


def test_float_layers_globs_keep_chosen_layers_float(trained, tmp_path):
    model, rep = trained["model"], trained["calib"][:8]
    path = tmp_path / "chosen.int8.tflite"
    export_tflite(model, path, fmt="int8", input_size=S, representative=rep,
                  float_layers=["block0_mlp_fc*"])  # fmt: skip
    f = TFLiteFile(path.read_bytes())
    fc = {f.tensors[op.outputs[0]].name: f.tensors[op.outputs[0]].dtype
          for op in f.ops if op.type == "FULLY_CONNECTED"}  # fmt: skip
    chosen = {n: d for n, d in fc.items() if "mlp_fc" in n}
    assert len(chosen) == 2 and set(chosen.values()) == {"FLOAT32"}
    assert {d for n, d in fc.items() if n not in chosen} == {"INT8"}
    with pytest.raises(ValueError, match="float_layers: 'nothing_\\*' matches no layer"):
        export_tflite(model, tmp_path / "x.tflite", fmt="int8", input_size=S,
                      representative=rep, float_layers=["nothing_*"])  # fmt: skip


def test_pad_in_front_of_a_float_conv_stays_float_too(tmp_path):
    """A PAD whose consumer stays float is kept float with it: XNNPACK then fuses it into the
    convolution, where an int8 PAD is a pass of its own plus a DEQUANTIZE of the padded map."""
    inputs = keras.Input((S, S, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem_conv")(inputs)
    x = keras.layers.ZeroPadding2D(1, name="dw_mult_pad")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=3, name="dw_mult")(x)
    x = keras.layers.ZeroPadding2D(1, name="pw_pad")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x))
    rng = np.random.default_rng(0)
    rep = [rng.uniform(0, 1, (1, S, S, 3)).astype("float32") for _ in range(8)]
    path = tmp_path / "pad.int8.tflite"
    assert export_tflite(model, path, fmt="int8", input_size=S, representative=rep)[
        "partitions"] == 1
    f = TFLiteFile(path.read_bytes())
    pads = {f.tensors[op.outputs[0]].name.split("/")[1]: f.tensors[op.outputs[0]].dtype
            for op in f.ops if op.type == "PAD"}
    assert pads == {"dw_mult_pad": "FLOAT32", "pw_pad": "INT8"}  # the int8 conv keeps its PAD


def test_channel_selection_kernels_are_not_counted_as_weights(tmp_path):
    """Mobile-Former's ChannelRepeat is a constant one-hot 1x1 conv: no weight, no sparsity."""
    from models.mobile_former import ChannelRepeat

    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = ChannelRepeat(3, name="repeat")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x))
    rep = np.random.default_rng(0).uniform(0, 1, (8, 8, 8, 3)).astype("float32")
    for fmt in ("fp32", "int8"):
        path = tmp_path / f"rep.{fmt}.tflite"
        export_tflite(model, path, fmt=fmt, input_size=8, representative=rep)
        a = audit_tflite(path)
        assert a["ops"]["CONV_2D"] == 2  # the repeat is a CONV_2D ...
        assert a["sparsity_weights"] == 3 * 3 * 3 * 4 and a["sparsity"] < 0.01  # ... not a weight
        f = TFLiteFile(path.read_bytes())
        kernels = [f.buffer_array(op.inputs[1]) for op in f.ops if op.type == "CONV_2D"]
        assert sum(audit_mod._is_selection_kernel(k, f.tensors[op.inputs[1]].shape)
                   for k, op in zip(kernels, [o for o in f.ops if o.type == "CONV_2D"])) == 1


def test_dead_units_get_a_usable_range_so_xnnpack_prepares_the_file(tmp_path, monkeypatch):
    """A ReLU unit that never fires on the calibration set (trained Mobile-Former hyper-MLPs have
    them) calibrates to the range [0, 0]; quantized as such, XNNPACK cannot prepare the next op
    (on mobile_former_26m it aborted with a double free). Narrow ranges are widened first."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(16, activation="relu", name="dead")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    dead = model.get_layer("dead")
    k, b = dead.get_weights()
    dead.set_weights([k, b - 100.0])  # never fires: the head then outputs its (zero) bias
    rep = np.random.default_rng(0).uniform(0, 1, (8, 8, 8, 3)).astype("float32")
    path = tmp_path / "dead.int8.tflite"
    info = export_tflite(model, path, fmt="int8", input_size=8, representative=rep)
    assert info["widened_ranges"] == 2 and info["partitions"] == 1
    a = audit_tflite(path)
    assert a["runnable"]["xnnpack"] and a["undelegated_ops"] == {}
    f = TFLiteFile(path.read_bytes())
    out = [f.tensors[op.outputs[0]] for op in f.ops if op.type == "FULLY_CONNECTED"][0]
    assert out.scale[0] == pytest.approx(fast_int8.MIN_RANGE / 255, rel=1e-3)
    assert out.zero_point[0] == -128  # a ReLU output stays non-negative
    np.testing.assert_allclose(run_tflite(make_interpreter(str(path)), rep), 0.0, atol=1e-6)
    monkeypatch.setattr(fast_int8, "MIN_RANGE", 0.0)  # the failure it prevents
    bad = export_tflite(model, tmp_path / "bad.tflite", fmt="int8", input_size=8,
                        representative=rep)
    assert bad["widened_ranges"] == 0 and bad["partitions"] == 0


def test_int8_ops_xnnpack_takes_in_float_only_can_run_in_float(files, trained, tmp_path):
    """What a QAT model's fake-quant nodes force on the converter (an int8 GELU) is run in float
    between a DEQUANTIZE and a QUANTIZE: one partition, and the same outputs up to int8 rounding
    (the GELU's input and output keep their quantization)."""
    from compress.tflite.flatbuffer import run_in_float

    plain = TFLiteFile(files["int8_plain"]["path"])
    gelu = [op.index for op in plain.ops if op.type == "GELU"]
    assert gelu and all(plain.tensors[plain.ops[i].outputs[0]].dtype == "INT8" for i in gelu)
    path = tmp_path / "gelu_in_float.tflite"
    path.write_bytes(run_in_float(plain.data_bytes(), gelu))
    f = TFLiteFile(path.read_bytes())
    assert len(f.ops) == len(plain.ops) + 2 * len(gelu)
    g = [op for op in f.ops if op.type == "GELU"]
    assert {f.tensors[t].dtype for op in g for t in op.inputs + op.outputs} == {"FLOAT32"}
    for op in g:  # DEQUANTIZE in front, QUANTIZE behind, into the original int8 tensor
        assert f.ops[f.producer[op.inputs[0]]].type == "DEQUANTIZE"
        assert [f.ops[c].type for c in f.consumers[op.outputs[0]]] == ["QUANTIZE"]
    assert "GELU" not in audit_tflite(path)["undelegated_ops"]
    assert "GELU" in audit_tflite(files["int8_plain"]["path"])["undelegated_ops"]
    x = trained["calib"][:8]
    a = run_tflite(make_interpreter(files["int8_plain"]["path"]), x)
    b = run_tflite(make_interpreter(str(path)), x)
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())


def test_constant_right_hand_matmul_input_is_made_symmetric(tmp_path):
    """A BATCH_MATMUL whose right-hand input is computed from learned constants only (Mobile-
    Former's first bridge: its tokens are the learned ones) gets a constant int8 operand with
    a non-zero zero point, which XNNPACK refuses: it is re-encoded with zero point 0 and the op
    stays int8, in one partition."""
    from models.mobile_former import GlobalTokens

    inputs = keras.Input((S, S, 3), name="image")
    x = keras.layers.Conv2D(8, 4, strides=4, activation="relu", name="conv")(inputs)
    flat = keras.layers.Reshape((-1, 8), name="flat")(x)
    q = GlobalTokens(3, 8, name="tokens")(inputs)
    q = keras.layers.Dense(8, name="q")(q)  # constant-folded: a learned [3, 8] operand
    s = MatMul(transpose_b=True, name="qk")([flat, q])
    s = keras.layers.Flatten(name="flatten")(s)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(s))
    rng = np.random.default_rng(0)
    rep = rng.uniform(0, 1, (8, S, S, 3)).astype("float32")
    path = tmp_path / "const_rhs.int8.tflite"
    info = export_tflite(model, path, fmt="int8", input_size=S, representative=rep)
    assert info["partitions"] == 1 and info["passes"] == 1 and info["bmm_rhs_symmetric"] == 1
    f = TFLiteFile(path.read_bytes())
    (bmm,) = [op for op in f.ops if op.type == "BATCH_MATMUL"]
    lhs, rhs = (f.tensors[i] for i in bmm.inputs[:2])
    assert lhs.dtype == rhs.dtype == "INT8" and rhs.has_data and rhs.zero_point[0] == 0
    # the operand holds the learned values up to the converter's half step (of an asymmetric
    # scale, smaller than the new one) plus the re-encoding's half step
    want = model.get_layer("q")(model.get_layer("tokens")(rep[:1])).numpy()[0]
    got = f.buffer_array(rhs.index).astype(np.float32).reshape(want.shape) * rhs.scale[0]
    np.testing.assert_allclose(got, want, atol=rhs.scale[0] * 1.001)
    assert parity(model, path, rep)["rel_l2"] < 0.05
