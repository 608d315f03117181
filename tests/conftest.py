"""Shared fixtures. Tests run from the repository root (pytest's pythonpath is set to '.')."""

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


@pytest.fixture(scope="session")
def imagenette_dir():
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"Imagenette not found at {IMAGENETTE} (set IMAGENETTE_DIR)")
    return IMAGENETTE


@pytest.fixture
def rng():
    return np.random.default_rng(0)
