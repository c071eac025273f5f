"""Shared test fixtures."""
import zlib

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Run the test with 64-bit floats, for comparisons against float64 references."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng(request):
    """A fresh numpy Generator per test, seeded from the test's name so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
