"""scripts/convert_timm.py end to end: a timm checkpoint file in, Keras weights out, same logits."""

import subprocess
import sys

import numpy as np
import pytest

import models
from models.compat import keras
from tests.helpers import import_torch_timm, require_module

torch, timm = import_torch_timm()


def test_checkpoint_file_converts_to_matching_keras_weights(tmp_path):
    torch.manual_seed(0)
    tm = timm.create_model("efficientformer_l1", pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics and layer scales, so a wrong mapping shows
        for name, p in tm.named_parameters():
            if "layer_scale" in name or "attention_biases" in name:
                p.copy_(torch.randn_like(p) * 0.1)
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "l1.pth"
    torch.save({"state_dict": tm.state_dict()}, ckpt)  # training-checkpoint nesting
    out = tmp_path / "l1.h5"
    proc = subprocess.run([sys.executable, "scripts/convert_timm.py", "--model=efficientformer_l1",
                           f"--checkpoint={ckpt}", f"--output={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10 classes" in proc.stdout

    keras.backend.clear_session()
    model = models.create_model("efficientformer_l1", num_classes=10)
    model.load_weights(str(out))
    x = np.random.default_rng(0).random((2, 224, 224, 3)).astype("float32")
    with torch.no_grad():
        ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(model(x).numpy(), ref, atol=1e-4)


def test_bad_arguments_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/convert_timm.py", "--model=vit_tiny_patch16",
                           f"--checkpoint={tmp_path / 'missing.pth'}", f"--output={tmp_path}/x.h5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "junk.pth").write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "scripts/convert_timm.py", "--model=efficientformer_l1",
                           f"--checkpoint={tmp_path / 'junk.pth'}", f"--output={tmp_path}/x.h5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "cannot read" in proc.stderr


def _convert(model_name, ckpt, out):
    return subprocess.run([sys.executable, "scripts/convert_timm.py", f"--model={model_name}",
                           f"--checkpoint={ckpt}", f"--output={out}"],
                          capture_output=True, text=True, timeout=300)


def test_vit_checkpoint_converts_to_matching_keras_weights(tmp_path):
    safetensors_torch = require_module("safetensors.torch")
    torch.manual_seed(0)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # timm inits biases to 0 and norms to 1: perturb them all
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "vit_tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, ckpt)
    out = tmp_path / "vit_tiny.h5"
    proc = _convert("vit_tiny_patch16", ckpt, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10 classes" in proc.stdout

    keras.backend.clear_session()
    model = models.create_model("vit_tiny_patch16", num_classes=10)
    model.load_weights(str(out))
    x = np.random.default_rng(0).random((2, 224, 224, 3)).astype("float32")
    with torch.no_grad():
        ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(model(x).numpy(), ref, atol=1e-4, rtol=1e-4)


def test_vit_conversion_refuses_other_models_in_one_line(tmp_path):
    """In-process (the script puts --checkpoint=FILE before the message: the test above)."""
    from models import timm_convert

    resnet = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), resnet)
    with pytest.raises(ValueError, match="is not a ViT checkpoint: expected timm ViT keys"):
        timm_convert.convert("vit_small_patch16", timm_convert.read_state_dict(resnet))
    tiny = tmp_path / "tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tiny)
    with pytest.raises(ValueError, match=r"does not fit vit_small_patch16: dim 192 \(model: 384\)"):
        timm_convert.convert("vit_small_patch16", timm_convert.read_state_dict(tiny))
