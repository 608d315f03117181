"""EfficientFormer v1: logits against timm's `efficientformer_l*` (random weights, with the
init-time zero/1e-5 tensors randomised so a wrong mapping shows), the timm state-dict converter,
non-default sizes, graph hygiene and TFLite conversion (fp32 and full-integer int8)."""

import collections

import numpy as np
import pytest

import models
from models.compat import keras, tf
from models.efficientformer import AttentionBias, convert_timm_state_dict
from tests.helpers import import_torch_timm, load_images, run_tflite

torch, timm = import_torch_timm()  # blocks triton, which segfaults when loaded after TensorFlow
TOL = 1e-4


def random_timm(name: str, seed: int = 0):
    """timm model, eval mode, with BN stats, attention biases and layer scales randomised."""
    torch.manual_seed(seed)
    tm = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if n.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            elif "norm" in n and p.ndim == 1:  # BN / LN affine
                p.copy_((torch.rand(p.shape, generator=g) + 0.5) if n.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.1)
        for n, b in tm.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif n.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return tm


def state_dict_numpy(tm):
    return {k: v.detach().numpy() for k, v in tm.state_dict().items()}


def timm_logits(tm, x):
    with torch.no_grad():
        return tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


@pytest.fixture(scope="module")
def images(imagenette_dir):
    return load_images(imagenette_dir, 4, 224, imagenet_norm=True)


@pytest.fixture(scope="module")
def l1_pair():
    keras.backend.clear_session()
    tm = random_timm("efficientformer_l1")
    sd = state_dict_numpy(tm)
    km = models.create_model("efficientformer_l1")
    convert_timm_state_dict(km, sd)
    return tm, km, sd


def test_l1_logits_match_timm(l1_pair, images):
    tm, km, _ = l1_pair
    ref = timm_logits(tm, images)
    out = km.predict(images, verbose=0)
    diff = np.abs(out - ref).max()
    print(f"efficientformer_l1 max|keras - timm| = {diff:.3g} (max|logit| {np.abs(ref).max():.3g})")
    assert out.shape == (len(images), 1000)
    assert np.std(ref) > 0.05  # the comparison is not between near-constant outputs
    assert diff <= TOL


def test_two_heads_match_timm_distilled_training(l1_pair, images):
    tm, _, sd = l1_pair
    km2 = models.create_model("efficientformer_l1", with_distillation_head=True)
    assert len(km2.outputs) == 2
    convert_timm_state_dict(km2, sd)
    tm.set_distilled_training(True)
    tm.train()  # timm returns the two heads only in training mode; keep BN on running stats
    for m in tm.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    try:
        with torch.no_grad():
            ref_cls, ref_dist = (t.numpy() for t in tm(torch.from_numpy(
                images.transpose(0, 3, 1, 2))))
    finally:
        tm.set_distilled_training(False)
        tm.eval()
    cls, dist = km2.predict(images, verbose=0)
    d = max(np.abs(cls - ref_cls).max(), np.abs(dist - ref_dist).max())
    print(f"two heads max|keras - timm| = {d:.3g}")
    assert np.abs(ref_cls - ref_dist).max() > 0.01  # the heads differ, so a swap would show
    assert d <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in models.list_models(family="efficientformer")
                                  if n != "efficientformer_l1"])
def test_l3_l7_logits_match_timm(name, imagenette_dir):
    keras.backend.clear_session()
    x = load_images(imagenette_dir, 2, 224, imagenet_norm=True)
    tm = random_timm(name, seed=1)
    km = models.create_model(name)
    convert_timm_state_dict(km, state_dict_numpy(tm))
    ref = timm_logits(tm, x)
    diff = np.abs(km.predict(x, verbose=0) - ref).max()
    print(f"{name} max|keras - timm| = {diff:.3g}")
    assert diff <= TOL


def test_converter_refuses_bad_state_dicts(l1_pair):
    _, km, sd = l1_pair
    missing = {k: v for k, v in sd.items() if k != "stages.3.blocks.4.token_mixer.proj.weight"}
    with pytest.raises(ValueError,
                       match=r"1 missing key\(s\): stages\.3\.blocks\.4\.token_mixer\.proj\.weight$"):
        convert_timm_state_dict(km, missing)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): extra\.weight$"):
        convert_timm_state_dict(km, {**sd, "extra.weight": np.zeros(3)})
    small = models.create_model("efficientformer_l1", num_classes=10)
    with pytest.raises(ValueError, match="head/kernel.*\\(448, 10\\).*\\(448, 1000\\)"):
        convert_timm_state_dict(small, sd)


def test_attention_bias_is_timm_table_at_224_and_interpolated_at_256(l1_pair):
    _, km, sd = l1_pair
    prefix = "stages.3.blocks.4.token_mixer."
    table, idx = sd[prefix + "attention_biases"], sd[prefix + "attention_bias_idxs"]
    layer = km.get_layer("stage3_block3_attn_bias")
    assert tuple(layer.attention_biases.shape) == (8, 49)
    got = layer(tf.zeros((1, 8, 49, 49))).numpy()[0]
    np.testing.assert_allclose(got, table[:, idx], rtol=0, atol=1e-6)  # identity resize

    # 256 px: 8x8 grid; the same (8, 49) table, resized like torch's bilinear (half-pixel).
    layer256 = AttentionBias(7)
    layer256.build((None, 8, 64, 64))
    layer256.set_weights([table])
    t = torch.nn.functional.interpolate(torch.from_numpy(table).reshape(1, 8, 7, 7), size=(8, 8),
                                        mode="bilinear", align_corners=False).reshape(8, 64)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    pos = np.stack([rows.ravel(), cols.ravel()])
    rel = np.abs(pos[:, :, None] - pos[:, None, :])
    want = t.numpy()[:, rel[0] * 8 + rel[1]]
    np.testing.assert_allclose(layer256(tf.zeros((1, 8, 64, 64))).numpy()[0], want, atol=1e-5)


def test_non_default_size_shares_weights(l1_pair, images):
    _, km, _ = l1_pair
    m256 = models.create_model("efficientformer_l1", input_size=256)
    assert m256.input_shape == (None, 256, 256, 3)
    m256.set_weights(km.get_weights())  # the same shapes: the bias table stays 7x7
    x = tf.image.resize(images[:2], (256, 256)).numpy()
    out = m256.predict(x, verbose=0)
    assert out.shape == (2, 1000) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="multiples of 32"):
        models.create_model("efficientformer_l1", input_size=240)


def test_graph_has_no_lambda_or_mha(l1_pair):
    """Stock layers and small custom ones only (clone_model and the config and h5 round trips
    of every model are in test_all_models.py)."""
    _, km, _ = l1_pair
    banned = {"TFOpLambda", "Lambda", "MultiHeadAttention", "SlicingOpLambda"}
    assert not {type(layer).__name__ for layer in km.layers} & banned
    assert km.input_shape == (None, 224, 224, 3) and km.output_shape == (None, 1000)
    assert type(km.layers[-1]) is keras.layers.Average  # (head + head_dist) / 2
    for layer in km.layers:  # every custom layer says what pruning may touch
        if type(layer).__module__.startswith("models."):
            assert layer.get_prunable_weights() == []


# --------------------------------------------------------------------------------------------
# TFLite


def randomise_keras(model, seed=0):
    """Give the zero/1e-5-initialised tensors (bias tables, layer scales, BN stats) real values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, AttentionBias):
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
        elif type(layer).__name__ == "LayerScale":
            layer.set_weights([rng.uniform(0.1, 0.6, w.shape).astype("float32")
                               for w in layer.weights])
        elif isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                               rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 1.5, v.shape)])


def litert(content):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    return Interpreter(model_content=content, experimental_op_resolver_type=(
        OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))


def op_names(content):
    return [op["op_name"] for op in litert(content)._get_ops_details()]


def builtin_names():
    from tensorflow.lite.python import schema_py_generated as schema

    return {n for n in dir(schema.BuiltinOperator) if n.isupper()} - {"CUSTOM", "DELEGATE"}


@pytest.fixture(scope="module")
def tflite_files(images, tmp_path_factory):
    """fp32 and the converter's plain full-integer int8 (TFLITE_BUILTINS_INT8, float I/O), both
    through the project's `export_tflite`."""
    from compress.tflite.convert import export_tflite

    keras.backend.clear_session()
    model = models.create_model("efficientformer_l1", num_classes=10, input_size=224)
    randomise_keras(model)
    folder = tmp_path_factory.mktemp("efficientformer_tflite")
    export_tflite(model, folder / "fp32.tflite", fmt="fp32", input_size=224)
    export_tflite(model, folder / "int8.tflite", fmt="int8", input_size=224, representative=images,
                  xnnpack_friendly=False, strict_int8=True)
    return model, (folder / "fp32.tflite").read_bytes(), (folder / "int8.tflite").read_bytes()


def test_tflite_fp32_builtin_and_matches_keras(tflite_files, images):
    model, fp32, _ = tflite_files
    ops = op_names(fp32)
    assert set(ops) <= builtin_names(), sorted(set(ops) - builtin_names())
    assert "SPLIT_V" not in ops and "RESIZE_BILINEAR" not in ops
    # The attention-bias gather folds into a constant (GATHERs left are Dense shape arithmetic).
    interp = litert(fp32)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    assert not [op for op in interp._get_ops_details() if op["op_name"] == "GATHER"
                and tensors[op["outputs"][0]]["dtype"] != np.int32]
    ref = model.predict(images, verbose=0)
    diff = np.abs(run_tflite(fp32, images) - ref).max()
    print(f"tflite fp32 max|litert - keras| = {diff:.3g}; ops {sorted(set(ops))}")
    assert np.std(ref) > 0.01 and diff <= TOL


def test_tflite_int8_full_integer_builtin(tflite_files, images):
    _, _, int8 = tflite_files
    interp = litert(int8)
    interp.allocate_tensors()
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    names = {op["op_name"] for op in ops}
    assert names <= builtin_names(), sorted(names - builtin_names())
    heavy = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"}
    float_heavy = [op["op_name"] for op in ops if op["op_name"] in heavy
                   and any(tensors[i]["dtype"] == np.float32 for i in op["outputs"])]
    assert not float_heavy
    assert sum(op["op_name"] in heavy for op in ops) > 20
    out = run_tflite(int8, images)
    assert out.shape == (len(images), 10) and np.isfinite(out).all()
    ref = tflite_files[0].predict(images, verbose=0)
    cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    counts = dict(collections.Counter(op["op_name"] for op in ops))
    print(f"tflite int8 vs keras: cosine {np.round(cos, 3)}, max|diff| {np.abs(out - ref).max():.3g}"
          f" (max|logit| {np.abs(ref).max():.3g}); ops {counts}")
