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
    ("--config.mixed_precision=bf16",
     "--config.mixed_precision: 'bf16' is not accepted; accepted: .*'auto'"),
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
