"""Fixtures of the trainer tests; helpers are in train_testlib.py."""
import pytest


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """One persistent JAX compilation cache for the subprocess runs of a worker."""
    return str(tmp_path_factory.mktemp("jax_cache"))
