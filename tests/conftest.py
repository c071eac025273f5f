"""Shared test fixtures, and the compiler setting of every test process."""
import os
import zlib

# Most of the suite's time is XLA compiling small programs that then run for microseconds.
# Compiling them without LLVM's optimisation passes (what `jax_disable_most_optimizations`
# does) halves that time; the HLO, and so the arithmetic, is the same program's. Set in the
# environment so that the trainer subprocesses the tests start compile the same way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

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
