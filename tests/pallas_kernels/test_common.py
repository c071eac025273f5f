"""The chunk layout moves packed sequences onto chunk boundaries and back, losslessly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import chunk_layout, check_chunk_size, resolve_impl, token_layout


def test_varlen_chunk_layout_roundtrip_under_jit(rng):
    T, C = 37, 8
    cu = jnp.array([0, 5, 5, 21, 30], jnp.int32)  # an empty sequence, and 7 dropped tokens
    x = jnp.asarray(rng.standard_normal((1, T, 3)), jnp.float32)

    @jax.jit
    def roundtrip(x, cu):
        layout = chunk_layout(1, T, C, cu)
        return layout.from_chunks(layout.to_chunks(x)), layout.reset, layout.last_chunk

    y, reset, last = roundtrip(x, cu)
    np.testing.assert_array_equal(np.asarray(y[:, :30]), np.asarray(x[:, :30]))
    np.testing.assert_array_equal(np.asarray(y[:, 30:]), 0)
    # Sequences of lengths 5, 0, 16, 9 start at chunks 0, -, 1, 3 and end at chunks 0, -, 2, 4.
    assert np.asarray(reset)[0, :6].tolist() == [True, True, False, True, False, False]
    assert np.asarray(last)[[0, 2, 3]].tolist() == [0, 2, 4]
    # Other offsets, same shapes: the compiled function is reused.
    roundtrip(x, jnp.array([0, 1, 2, 3, 37], jnp.int32))
    assert roundtrip._cache_size() == 1


def test_token_layout_marks_sequence_starts():
    layout = token_layout(1, 6, jnp.array([0, 2, 2, 6], jnp.int32))
    assert np.asarray(layout.is_start)[0].tolist() == [True, False, True, False, False, False]
    assert np.asarray(layout.seq)[0].tolist() == [0, 0, 2, 2, 2, 2]


@pytest.mark.parametrize("bad", [0, 3, 48, 64.0])
def test_chunk_size_must_be_power_of_two(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        check_chunk_size(bad)


def test_impl_names_are_checked():
    assert resolve_impl("auto") == ("xla" if jax.default_backend() == "cpu" else "pallas")
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda")
