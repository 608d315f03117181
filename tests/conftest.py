"""Shared fixtures. Tests run from the repository root (pytest's pythonpath is set to '.');
shared helpers live in tests/helpers.py."""

import numpy as np
import pytest

from tests.helpers import IMAGENETTE, REPO, block_triton, require_imagenette  # noqa: F401

# torch (imported by timm) loads triton, whose native library segfaults once TensorFlow is
# loaded; CPU torch does not need it. Block it before any test imports torch.
block_triton()


@pytest.fixture(scope="session")
def imagenette_dir():
    """The real data set (skipped where it is missing; with CI=true, a failure)."""
    return require_imagenette()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
