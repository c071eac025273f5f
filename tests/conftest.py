"""Shared test fixtures, and the compiler setting of every test process."""
import os
import zlib

# Most of the suite's time is XLA compiling small programs that then run for microseconds.
# Compiling them without LLVM's optimisation passes (what `jax_disable_most_optimizations`
# does) halves that time; the HLO, and so the arithmetic, is the same program's. Set in the
# environment so that the trainer subprocesses the tests start compile the same way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def _with_legacy_cpu_emitters() -> None:
    """Compile CPU fusions with XLA's older elemental emitters: the same HLO, code generated in
    about half the time (the test subset of test_model.py and test_transforms.py: 270 -> 142 s
    of CPU). An XLA that does not know the flag aborts at start-up, so a child process tries it
    first; the result is exported, so xdist workers and trainer subprocesses inherit it."""
    import subprocess
    import sys
    flag = "--xla_cpu_use_fusion_emitters=false"
    if os.environ.get("MEM_LM_TEST_XLA_FLAGS_PROBED") or flag in os.environ.get("XLA_FLAGS", ""):
        return
    os.environ["MEM_LM_TEST_XLA_FLAGS_PROBED"] = "1"
    flags = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=120)
    if probe.returncode == 0 and "no longer supported" not in probe.stderr:
        os.environ["XLA_FLAGS"] = flags


_with_legacy_cpu_emitters()

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
