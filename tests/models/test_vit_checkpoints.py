"""ViT teachers from timm / Hugging Face checkpoints written in their real formats, checked
against timm's and transformers' own forward passes (models/vit_checkpoints.py)."""

import json

import numpy as np
import pytest

from experiments.workdir import StageDir
from models import vit_checkpoints
from models.compat import keras
from tests.helpers import import_torch_timm, require_module

torch, timm = import_torch_timm()
safetensors_torch = require_module("safetensors.torch")

# Narrow and shallow, but a width timm's head table knows (192 -> 3 heads).
TINY = dict(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=10)


def randomize_(module, seed=0):
    """Non-trivial weights everywhere (timm inits biases to 0, norms to 1), so a wrong mapping
    of any tensor changes the logits by far more than the tolerance."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm1.weight") or
                                                  "norm" in name and name.endswith("weight")
                                                  else 0.0))
    return module.eval()


def timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    return randomize_(VisionTransformer(**{**TINY, **kwargs}))


def save(model, path):
    if str(path).endswith(".safetensors"):
        safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(path))
    else:
        torch.save(model.state_dict(), path)
    return str(path)


def torch_logits(model, x, **kwargs):
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 3, 1, 2), **kwargs)
    return (out.logits if hasattr(out, "logits") else out).numpy()


def keras_teacher(path, *, input_size, num_classes=10):
    keras.backend.clear_session()
    spec = vit_checkpoints.teacher_spec(path, input_size=input_size)
    model = vit_checkpoints.build_model(spec, num_classes=num_classes)
    return model, spec, vit_checkpoints.load_checkpoint(model, path)


@pytest.mark.parametrize("fmt, variant", [
    ("pth", {}),
    ("safetensors", {}),
    ("safetensors", {"pre_norm": True}),  # timm's CLIP-style norm_pre, bias-free patch conv
    ("pth", {"no_embed_class": True}),  # DeiT III style: no position for the class token
])
def test_timm_checkpoint_logits_equal_timm(tmp_path, rng, fmt, variant):
    tm = timm_vit(**variant)
    path = save(tm, tmp_path / f"vit.{fmt}")
    model, spec, summary = keras_teacher(path, input_size=32)
    assert summary["head_loaded"] and spec["name"] == "vit_tiny_patch16"  # nearest width, 192
    assert spec["overrides"]["depth"] == 2 and spec["overrides"]["pos_grid"] == 2
    assert spec["overrides"].get("pre_norm", False) == variant.get("pre_norm", False)
    x = rng.random((2, 32, 32, 3)).astype("float32")
    ref = torch_logits(tm, x)
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero outputs
    np.testing.assert_allclose(model(x).numpy(), ref, atol=1e-4, rtol=1e-4)


def test_position_embedding_resampled_as_timm_does(tmp_path, rng):
    """Teacher stage at 64 px from a 32-px checkpoint: equals timm's model at 64 px with the
    embedding resampled by timm's `resample_abs_pos_embed`."""
    from timm.layers import resample_abs_pos_embed

    tm = timm_vit()
    path = save(tm, tmp_path / "vit.safetensors")
    model, spec, _ = keras_teacher(path, input_size=64)
    assert spec["overrides"]["pos_grid"] == 4
    sd = tm.state_dict()
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (4, 4), num_prefix_tokens=1)
    big = timm_vit(img_size=64)
    big.load_state_dict(sd)
    x = rng.random((2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), torch_logits(big.eval(), x), atol=1e-4,
                               rtol=1e-4)


def test_other_class_count_gets_a_fresh_head(tmp_path, rng):
    path = save(timm_vit(), tmp_path / "vit.pth")
    keras.backend.clear_session()
    spec = vit_checkpoints.teacher_spec(path, input_size=32)
    model = vit_checkpoints.build_model(spec, num_classes=5)
    fresh = model.get_layer("head").get_weights()[0].copy()
    summary = vit_checkpoints.load_checkpoint(model, path)
    assert not summary["head_loaded"]
    np.testing.assert_array_equal(model.get_layer("head").get_weights()[0], fresh)
    assert model(rng.random((1, 32, 32, 3)).astype("float32")).shape == (1, 5)


def test_registered_architecture_is_saved_by_name(tmp_path):
    """A ViT-Ti checkpoint becomes `vit_tiny_patch16` with the teacher stage's grid as override;
    its parameters are timm's but for the smaller position grid. (Its logits against timm's:
    tests/scripts/test_convert_timm.py; the model.json round trip: the next test.)"""
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    spec = vit_checkpoints.teacher_spec(save(tm, tmp_path / "ti.safetensors"), input_size=64)
    assert spec == {"name": "vit_tiny_patch16", "overrides": {"pos_grid": 4}}
    keras.backend.clear_session()
    model = vit_checkpoints.build_model(spec, num_classes=10)
    timm_params = sum(p.numel() for p in tm.parameters())
    assert model.count_params() == timm_params - (196 - 16) * 192  # a 4x4 grid, not 14x14


def test_custom_architecture_round_trips_through_model_json(tmp_path, rng):
    from experiments.stages import Run

    path = save(timm_vit(), tmp_path / "vit.pth")
    model, spec, _ = keras_teacher(path, input_size=32)
    stage = StageDir(tmp_path, "teacher")
    stage.begin({})
    stage.save_model_json(**spec, num_classes=10, input_size=32)
    stage.save_weights(model)
    rebuilt, size = Run.load_teacher_from(None, stage)
    x = rng.random((2, 32, 32, 3)).astype("float32")
    assert size == 32
    np.testing.assert_allclose(rebuilt(x).numpy(), model(x).numpy(), atol=1e-6)


def test_hugging_face_folder_logits_equal_transformers(tmp_path, rng):
    transformers = require_module("transformers")
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=384, image_size=32, patch_size=16,
                                 num_labels=10)  # 4 heads: read from config.json, not the table
    hf = randomize_(transformers.ViTForImageClassification(cfg))
    folder = tmp_path / "hf_vit"
    hf.save_pretrained(folder)  # config.json + model.safetensors
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    model, spec, summary = keras_teacher(str(folder), input_size=32)
    assert summary["head_loaded"]
    assert spec["overrides"]["heads"] == 4 and spec["overrides"]["ln_eps"] == 1e-12
    x = rng.random((2, 32, 32, 3)).astype("float32")
    ref = torch_logits(hf, x)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(model(x).numpy(), ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- bad files
def _random_bytes(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    return p


def _resnet(tmp_path):
    p = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), p)
    return p


def _folder_without_config(tmp_path):
    p = tmp_path / "empty_folder"
    p.mkdir()
    return p


def _truncated(tmp_path, suffix):
    p = tmp_path / f"cut.{suffix}"
    save(timm_vit(), p)
    p.write_bytes(p.read_bytes()[:5000])
    return p


def _missing_key(tmp_path):
    sd = timm_vit().state_dict()
    del sd["blocks.1.norm1.weight"]
    p = tmp_path / "missing.pth"
    torch.save(sd, p)
    return p


def _hf_not_vit(tmp_path):
    p = tmp_path / "hf_resnet"
    p.mkdir()
    (p / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    return p


def _layer_scale(tmp_path):
    p = tmp_path / "deit3.pth"
    save(timm_vit(init_values=1e-5), p)
    return p


BAD_FILES = {
    "random bytes .safetensors": (_random_bytes, "cannot read"),
    "resnet18 state dict": (_resnet, "is not a ViT checkpoint: expected timm ViT keys"),
    "folder without config.json": (_folder_without_config, "folder without config.json"),
    "truncated .pth": (lambda t: _truncated(t, "pth"), "cannot read"),
    "truncated .safetensors": (lambda t: _truncated(t, "safetensors"), "cannot read"),
    "missing key": (_missing_key,
                    "keys do not match a timm ViT: 1 missing key(s): blocks.1.norm1.weight"),
    "config.json of a ResNet": (_hf_not_vit, "model_type 'resnet'; expected 'vit'"),
    "layer scale": (_layer_scale, "layer scale"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_checkpoint_gets_one_line_naming_the_file(tmp_path, case):
    make, expected = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ValueError) as info:
        vit_checkpoints.inspect_checkpoint(str(path))
    message = str(info.value)
    assert "\n" not in message and path.name in message and expected in message, message


def test_teacher_size_must_be_a_multiple_of_the_patch(tmp_path):
    path = save(timm_vit(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="input size 40 .* multiple of the patch size 16"):
        vit_checkpoints.teacher_spec(path, input_size=40)
