"""Fixtures of the compression tests (the tiny models: tests/helpers.py)."""

import numpy as np
import pytest


@pytest.fixture
def images():
    def make(n, size, seed=0):
        return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)
    return make
