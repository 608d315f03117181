"""The teacher resolver (models/teachers.py): every `--teacher` form resolved into a record, the
head planned for the data's classes, and the built teacher equal to the source model on
[0, 1] images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from models import imagenet, teachers
from models.compat import keras

IMAGENETTE_WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]


def _classifier(classes, *, softmax=True, size=32):
    """A small Keras image classifier expecting 0..255 pixels (like a Keras user's model)."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(classes, activation="softmax" if softmax else None, name="fc")(x)
    model = keras.Model(inp, x, name="user_net")
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model


def test_imagenet_wnids_are_the_sorted_1000():
    ids = imagenet.wnids()
    assert len(ids) == 1000 and list(ids) == sorted(ids) and ids[0] == "n01440764"
    assert imagenet.head_indices(IMAGENETTE_WNIDS) == [ids.index(w) for w in IMAGENETTE_WNIDS]
    assert imagenet.head_indices(["cat", "dog"]) is None
    with pytest.raises(ValueError, match="1 of the 3 data classes are not ImageNet wnids"):
        imagenet.head_indices(["n01440764", "n02102040", "cat"])


def test_registry_name_is_trained_from_labels():
    rec = teachers.plan_head(teachers.resolve("vit_tiny_patch16", input_size=64), ["a", "b"])
    assert (rec.kind, rec.head, rec.input_size, rec.trains) == ("scratch", "trained from labels",
                                                                64, True)


@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_keras_file_with_the_data_classes_teaches_as_saved(tmp_path, fmt):
    model = _classifier(10)
    path = str(tmp_path / ("saved" if fmt == "savedmodel" else f"m.{fmt}"))
    model.save(path, **({"save_format": "tf"} if fmt == "savedmodel" else {}))
    rec = teachers.plan_head(teachers.resolve(path), [f"c{i}" for i in range(10)])
    assert (rec.kind, rec.source_classes, rec.input_size, rec.head) == ("keras_file", 10, 32,
                                                                     "as saved")
    teacher = teachers.build(rec, 10, pretrained=True)
    x = np.random.default_rng(1).random((2, 32, 32, 3)).astype("float32")
    probs = keras.activations.softmax(teacher(x)).numpy()  # logits: the softmax layer is dropped
    np.testing.assert_allclose(probs, model(x * 255.0).numpy(), atol=1e-5)
    # the teacher stage saves weights.h5 and later stages rebuild the same graph
    teacher.save_weights(str(tmp_path / "w.h5"))
    again = teachers.build(teachers.TeacherRecord.from_json(json.loads(json.dumps(
        rec.to_json()))), 10)
    again.load_weights(str(tmp_path / "w.h5"))
    np.testing.assert_allclose(again(x).numpy(), teacher(x).numpy(), atol=1e-6)


def test_imagenet_head_is_sliced_to_wnid_classes(tmp_path):
    model = _classifier(1000, softmax=False)
    model.save(str(tmp_path / "in1k.keras"))
    rec = teachers.plan_head(teachers.resolve(str(tmp_path / "in1k.keras")), IMAGENETTE_WNIDS)
    assert rec.head.startswith("ImageNet head sliced") and not rec.trains
    x = np.random.default_rng(2).random((3, 32, 32, 3)).astype("float32")
    full = model(x * 255.0).numpy()
    sliced = teachers.build(rec, 10, pretrained=True)(x).numpy()
    np.testing.assert_allclose(sliced, full[:, rec.head_rows], atol=1e-5)
    # not wnids: the head is replaced and fine-tuned
    other = teachers.plan_head(teachers.resolve(str(tmp_path / "in1k.keras")), ["a", "b"])
    assert other.head == "replaced, fine-tuned" and other.trains
    assert teachers.build(other, 2, pretrained=True).output_shape == (None, 2)


def test_bad_teachers_are_one_line(tmp_path):
    _classifier(7).save(str(tmp_path / "seven.keras"))
    with pytest.raises(ValueError, match=r"head has 7 classes, which matches neither the data "
                                         r"\(10 classes\) nor ImageNet-1k"):
        teachers.plan_head(teachers.resolve(str(tmp_path / "seven.keras")), IMAGENETTE_WNIDS)
    inp = keras.Input((16, 16, 3))
    keras.Model(inp, keras.layers.Conv2D(4, 3)(inp)).save(str(tmp_path / "seg.keras"))
    with pytest.raises(ValueError, match="not an image classifier"):
        teachers.resolve(str(tmp_path / "seg.keras"))
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot load it as a saved Keras model"):
        teachers.resolve(str(tmp_path / "junk.keras"))
    with pytest.raises(ValueError, match="keras.applications.ResNet5 does not exist; did you "
                                         "mean ResNet50"):
        teachers.resolve("keras.applications.ResNet5")
    with pytest.raises(ValueError, match="data classes are not ImageNet wnids"):
        teachers.plan_head(teachers.resolve(str(tmp_path / "seven.keras")), ["n01440764", "cat"])


def test_keras_application_offline_and_uncached_is_one_line(tmp_path):
    """No weights in Keras's cache and no way to download them: one line, no traceback."""
    code = ("from models import teachers\n"
            "try:\n    teachers.resolve('keras.applications.MobileNetV3Small')\n"
            "except ValueError as e:\n    print('REFUSED', e)\n")
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "HOME": str(tmp_path),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    line = [l for l in out.stdout.splitlines() if l.startswith("REFUSED")]
    assert line and "its ImageNet weights are not in Keras's cache" in line[0], out.stdout + \
        out.stderr[-2000:]


def test_keras_application_normalisation_follows_its_family():
    assert teachers._KERAS_APP_MODE["resnet"] == "caffe"
    caffe = teachers._KERAS_APP_NORM["caffe"]
    conv = teachers._input_norm(caffe)
    x = np.random.default_rng(3).random((1, 4, 4, 3)).astype("float32")
    y = conv(x).numpy()
    expect = x[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68], "float32")
    np.testing.assert_allclose(y, expect, atol=1e-3)
