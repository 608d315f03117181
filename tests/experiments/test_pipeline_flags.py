"""The pipeline refuses bad flags with one line naming the flag and what it accepts."""

import subprocess
import sys

import pytest

BASE = ["--student=mobilevit_xxs", "--teacher=vit_tiny_patch16", "--data=/nonexistent",
        "--workdir=/tmp/never_written"]


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "experiments.pipeline", *args],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("--student=resnet50", "--student: unknown model 'resnet50'; accepted: .*mobilevit_xxs"),
    ("--teacher=nope", "--teacher: 'nope' is neither a registry name .*vit_tiny_patch16"),
    ("--preset=medium", "--preset=medium: value should be one of <smoke|quick|full>"),
    ("--stages=distill,polish", r"--stages: unknown stage\(s\) \['polish'\]; accepted: teacher,"),
    ("--strategy=horovod", "--strategy=horovod: value should be one of"),
    ("--export_size=100", "--export_size: 100 is not a positive multiple of 32"),
    ("--config.distill.stepz=3", 'unknown --config key stepz Did you mean "steps"'),
    ("--config.distill.steps=abc", "--config.distill.steps=abc: invalid literal for int"),
    ("--config.distill.kind=medium", "--config.distill.kind: 'medium' is not accepted; accepted"),
    ("--config.prune.target_sparsity=1.5", r"target_sparsity must be in \[0, 1\)"),
    ("--config.export.float_layers=('stage9_*',)",
     r"--config.export.float_layers: 'stage9_\*' matches no layer of mobilevit_xxs"),
    ("--bogus=1", "Unknown command line flag 'bogus'"),
])
def test_bad_flag_is_refused_with_accepted_values(override, expected):
    args = [a for a in BASE if a.split("=")[0] != override.split("=")[0]] + [override]
    code, err = run(*args)
    assert code != 0
    assert any(__import__("re").search(expected, line) for line in err.splitlines()), err[-2000:]
    assert "Traceback" not in err


def test_missing_data_folder_names_the_path():
    code, err = run("--student=mobilevit_xxs", "--teacher=vit_tiny_patch16",
                    "--data=/nonexistent/imagenette", "--workdir=/tmp/never_written")
    assert code != 0 and "/nonexistent/imagenette" in err and "Traceback" not in err


def _bad_teacher(tmp_path, kind):
    if kind == "random bytes .safetensors":
        path = tmp_path / "teacher.safetensors"
        path.write_bytes(bytes(range(256)) * 16)
    elif kind == "resnet18 .pth":
        timm, torch = pytest.importorskip("timm"), pytest.importorskip("torch")
        path = tmp_path / "resnet18.pth"
        torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    else:
        path = tmp_path / "hf_vit"
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, expected", [
    ("random bytes .safetensors", "cannot read"),
    ("resnet18 .pth", "is not a ViT checkpoint: expected timm ViT keys"),
    ("folder without config.json", "folder without config.json"),
])
def test_bad_teacher_checkpoint_is_refused_before_any_stage(tmp_path, kind, expected):
    path = _bad_teacher(tmp_path, kind)
    workdir = tmp_path / "run"
    code, err = run("--student=mobilevit_xxs", f"--teacher={path}", "--data=/nonexistent",
                    f"--workdir={workdir}")
    last = err.strip().splitlines()[-1]
    assert code != 0 and "Traceback" not in err
    assert last.startswith("FATAL Flags parsing error: --teacher: ") and str(path) in last, last
    assert expected in last, last
    assert not workdir.exists()  # refused before any stage (or data loading) ran


def test_good_teacher_checkpoint_passes_flag_validation(tmp_path):
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from timm.models.vision_transformer import VisionTransformer

    tm = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3)
    path = tmp_path / "vit.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
    code, err = run("--student=mobilevit_xxs", f"--teacher={path}",
                    "--data=/nonexistent/imagenette", f"--workdir={tmp_path / 'run'}")
    assert code != 0 and "--teacher" not in err and "/nonexistent/imagenette" in err, err[-2000:]
