"""scripts/convert_timm.py end to end: a timm checkpoint file in, Keras weights out, same logits."""

import subprocess
import sys

import numpy as np
import pytest

import models
from models.compat import keras

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")


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
