"""Every `--teacher` form through the pipeline's teacher stage on real Imagenette (smoke subset):
the record in teacher/model.json, how the head was made, whether it trained, its top-1.

The command lines run through `python -m tests.experiments.pipeline_cases` (TensorFlow imported once,
each case in a forked child, exactly as `python -m experiments.pipeline ARGV`).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from models.compat import keras
from tests.helpers import require_module

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = ["-m", "tests.experiments.pipeline_cases"]
BASE = ["--student=mobilevit_xxs", "--preset=smoke", "--stages=teacher",
         "--config.teacher.steps=2", "--config.teacher.warmup_steps=0",
         "--config.data.val_per_class=2"]


def _keras_in1k(path, *, save_format=None):
    """A small Keras classifier with an ImageNet-1k head, saved as a user would."""
    inp = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1000, activation="softmax")(x)
    keras.Model(inp, out).save(str(path), **({"save_format": save_format} if save_format else {}))
    return str(path)


def _hf_folder(path):
    transformers = require_module("transformers")
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=1, num_attention_heads=3,
                                 intermediate_size=384, image_size=64, patch_size=16,
                                 num_labels=10)
    transformers.ViTForImageClassification(cfg).save_pretrained(path)
    return str(path)


def _timm_in1k(path):
    torch = require_module("torch")
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=192, depth=1, num_heads=3,
                            num_classes=1000)
    torch.save(vit.state_dict(), path)
    return str(path)


def _google_npz(path):
    from tests.models.test_vit import write_flax_checkpoint

    write_flax_checkpoint(path, np.random.default_rng(0), dim=192, depth=1, heads=3,
                          mlp_dim=384, num_classes=1000, grid=4)
    return str(path)


# form -> (maker, expected kind, expected head (prefix), trains)
FORMS = {
    "package": (lambda tmp: "efficientnet_lite0", "package", "ImageNet head sliced", False),
    "package_own_size": (lambda tmp: "efficientnet_lite0", "package", "ImageNet head sliced",
                         False),
    "keras_file": (lambda tmp: _keras_in1k(tmp / "in1k.keras"), "keras_file",
                   "ImageNet head sliced", False),
    "savedmodel": (lambda tmp: _keras_in1k(tmp / "in1k_sm", save_format="tf"), "keras_file",
                   "ImageNet head sliced", False),
    "huggingface": (lambda tmp: _hf_folder(tmp / "hf_vit"), "checkpoint", "kept, fine-tuned",
                    True),
    "timm": (lambda tmp: _timm_in1k(tmp / "vit.pth"), "checkpoint", "ImageNet head sliced",
             False),
    "google_npz": (lambda tmp: _google_npz(tmp / "vit.npz"), "checkpoint",
                   "ImageNet head sliced", False),
    "registry": (lambda tmp: "vit_tiny_patch16", "scratch", "trained from labels", True),
    # the same images under class names that are not wnids: a new head, fine-tuned
    "package_new_head": (lambda tmp: "efficientnet_lite0", "package", "replaced, fine-tuned",
                         True),
}


def _relabelled(imagenette, root):
    """Imagenette with its class folders named c0..c9 (links), so no class is a wnid."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for i, wnid in enumerate(sorted(p.name for p in (imagenette / split).iterdir())):
            (root / split / f"c{i}").symlink_to(imagenette / split / wnid)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory, imagenette_dir):
    tmp = tmp_path_factory.mktemp("teacher_forms")
    cases = []
    for name, (make, *_) in FORMS.items():
        size = ["--config.teacher.input_size=0"] if name == "package_own_size" else []
        data = (_relabelled(imagenette_dir, tmp / "relabelled") if name == "package_new_head"
                else imagenette_dir)
        cases.append({"argv": [*BASE, *size, f"--teacher={make(tmp)}", f"--data={data}",
                               f"--workdir={tmp / name}"]})
    # a teacher folder of this project: the registry run's teacher/, in a second batch
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, *WORKER, str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "VIT_COMPRESS_CACHE": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(zip(FORMS, json.loads((tmp / "results.json").read_text())))
    folder_case = [{"argv": [*BASE, f"--teacher={tmp / 'registry' / 'teacher'}",
                             f"--data={imagenette_dir}", f"--workdir={tmp / 'folder'}"]}]
    (tmp / "cases2.json").write_text(json.dumps(folder_case))
    proc = subprocess.run([sys.executable, *WORKER, str(tmp / "cases2.json"),
                           str(tmp / "results2.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out["folder"] = json.loads((tmp / "results2.json").read_text())[0]
    return tmp, out


@pytest.mark.parametrize("form", [*FORMS, "folder"])
def test_teacher_form_runs_through_the_pipeline(results, form):
    tmp, out = results
    r = out[form]
    assert r["code"] == 0, (r["argv"], r["stderr"][-3000:])
    record = json.loads((tmp / form / "teacher" / "model.json").read_text())
    metrics = json.loads((tmp / form / "teacher" / "metrics.json").read_text())
    kind, head, trains = (("folder", "as saved", False) if form == "folder"
                          else FORMS[form][1:])
    assert record["kind"] == kind and record["head"].startswith(head), record
    assert record["num_classes"] == 10 and 0.0 <= metrics["val_top1"] <= 1.0
    assert (metrics["step"] > 0) == trains, metrics
    assert (tmp / form / "teacher" / "val_predictions.npy").exists()


def test_packaged_imagenet_teacher_classifies_imagenette_without_training(results):
    """EfficientNet-Lite0's ImageNet head sliced to Imagenette's ten wnids, at its own size
    (224): near-perfect on the 20 smoke validation images with no training at all (a wrong
    slice or normalisation scores near chance, 0.1)."""
    tmp, _ = results
    record = json.loads((tmp / "package_own_size" / "teacher" / "model.json").read_text())
    metrics = json.loads((tmp / "package_own_size" / "teacher" / "metrics.json").read_text())
    assert record["input_size"] == 224 and metrics["val_top1"] >= 0.85, (record, metrics)
