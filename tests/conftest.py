"""Shared fixtures, and the order test files start in. Tests run from the repository root
(pytest's pythonpath is set to '.'); shared helpers live in tests/helpers.py."""

import numpy as np
import pytest

from tests.helpers import IMAGENETTE, REPO, block_triton, require_imagenette  # noqa: F401

# torch (imported by timm) loads triton, whose native library segfaults once TensorFlow is
# loaded; CPU torch does not need it. Block it before any test imports torch.
block_triton()

# The longest test files of the default tier (a pipeline run or a batch of them; every registered
# model built), longest first, start before the others: pytest-xdist hands out whole files
# (`--dist loadfile`) in collection order, and a long file handed out last would run alone at the
# end while the other worker idles. A file missing here only starts later; no test is skipped.
LONGEST_FIRST = ("tests/experiments/test_pipeline_smoke.py", "tests/models/test_all_models.py",
                 "tests/experiments/test_stale.py", "tests/experiments/test_bad_inputs.py",
                 "tests/compress/test_structured.py", "tests/experiments/test_teacher_forms.py",
                 "tests/compress/test_training.py", "tests/models/test_mobile_former.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable


@pytest.fixture(scope="session")
def imagenette_dir():
    """The real data set (skipped where it is missing; with CI=true, a failure)."""
    return require_imagenette()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
