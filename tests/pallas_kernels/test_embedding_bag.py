"""embedding_bag: every impl (and both Pallas layouts in interpret mode) against the float64
slot-by-slot reference in outputs and gradients; duplicate and out-of-range indices, a bf16
table, bad inputs; the kernels lower for TPU and CUDA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.embedding_bag import embedding_bag
from pallas_kernels.embedding_bag.pallas import embedding_bag_pallas
from test_pallas_lowering import PLATFORMS, platform_unavailable

IMPLS = {
    "xla": lambda i, w, t: embedding_bag(i, w, t, impl="xla"),
    "pallas_tpu": lambda i, w, t: embedding_bag_pallas(i, w, t, backend="tpu", interpret=True),
    "pallas_gpu": lambda i, w, t: embedding_bag_pallas(i, w, t, backend="gpu", interpret=True),
}


def reference(i, w, t):
    return embedding_bag(i, w, t, impl="reference")


def make(rng, lead=(2, 3), k=5, N=23, D=12, dtype=np.float64, lo=0, hi=None):
    i = rng.integers(lo, N if hi is None else hi, lead + (k,)).astype(np.int32)
    w = rng.standard_normal(lead + (k,)).astype(dtype)
    t = rng.standard_normal((N, D)).astype(dtype)
    return jnp.asarray(i), jnp.asarray(w), jnp.asarray(t)


def numpy_bag(i, w, t):
    """The definition, in NumPy float64: out-of-range slots add nothing."""
    i, w, t = np.asarray(i), np.asarray(w, np.float64), np.asarray(t, np.float64)
    ok = (i >= 0) & (i < t.shape[0])
    return np.einsum("...k,...kd->...d", np.where(ok, w, 0), t[np.where(ok, i, 0)])


def grads(fn, i, w, t, ct):
    return jax.jit(jax.grad(lambda w, t: jnp.sum(fn(i, w, t) * ct), (0, 1)))(w, t)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_matches_reference_float64(impl, x64, rng):
    """Outputs and both gradients in float64, with repeated indices inside a bag and across
    tokens (the table gradient must add them) and indices outside [0, N) (they add nothing)."""
    i, w, t = make(rng, N=9, lo=-3, hi=12)     # 5 slots from 9 rows + 6 invalid values
    assert len(np.unique(np.asarray(i))) < i.size and ((i < 0) | (i >= 9)).any()
    ct = jnp.asarray(rng.standard_normal((2, 3, 12)))
    o = jax.jit(IMPLS[impl])(i, w, t)
    assert o.dtype == jnp.float64
    np.testing.assert_allclose(o, numpy_bag(i, w, t), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference(i, w, t), numpy_bag(i, w, t), rtol=1e-12, atol=1e-12)
    dw, dt = grads(IMPLS[impl], i, w, t, ct)
    rdw, rdt = grads(reference, i, w, t, ct)
    np.testing.assert_allclose(dw, rdw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dt, rdt, rtol=1e-12, atol=1e-12)
    bad = (np.asarray(i) < 0) | (np.asarray(i) >= 9)
    assert np.all(np.asarray(dw)[bad] == 0)


def test_bf16_table_gradient_sums_duplicates_in_float32(rng):
    """A bf16 table, float32 weights: the output is float32, and the table gradient of a row hit
    by many tokens is their float32 sum rounded once (autodiff of the gather would round after
    every addition in bf16)."""
    i = jnp.zeros((512, 1), jnp.int32)            # every token reads row 0
    w = jnp.full((512, 1), 1.0, jnp.float32)
    t = jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)
    ct = jnp.full((512, 8), 1.0 + 2.0**-9, jnp.float32)   # below bf16's resolution near 1
    exact = np.float32(512 * (1.0 + 2.0**-9))
    for impl in ("xla", "pallas_gpu"):
        o = jax.jit(IMPLS[impl])(i, w, t)
        assert o.dtype == jnp.float32
        np.testing.assert_array_equal(o, np.broadcast_to(np.asarray(t[0], np.float32), o.shape))
        _, dt = grads(IMPLS[impl], i, w, t, ct)
        assert dt.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(dt[0], np.float32),
                                      np.float32(jnp.bfloat16(exact)))
        assert not np.asarray(dt[1:], np.float32).any()


def test_transforms_agree(rng):
    """vmap and checkpoint around the op give the plain op's values and gradients."""
    i, w, t = make(rng, lead=(3, 4), dtype=np.float32)
    fn = IMPLS["pallas_tpu"]
    direct = grads(fn, i, w, t, jnp.ones((3, 4, 12)))
    mapped = jax.jit(jax.vmap(lambda ii, ww: fn(ii, ww, t)))(i, w)
    np.testing.assert_allclose(mapped, jax.jit(fn)(i, w, t), rtol=1e-6, atol=1e-6)
    remat = grads(jax.checkpoint(fn), i, w, t, jnp.ones((3, 4, 12)))
    for a, b in zip(direct, remat):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_no_tokens_or_no_slots_give_zeros(shape):
    for impl in ("reference", "xla", "pallas"):
        o = embedding_bag(np.zeros(shape, np.int32), np.ones(shape, np.float32),
                          np.ones((5, 3), np.float32), impl=impl)
        assert o.shape == shape[:-1] + (3,) and not np.asarray(o).any(), impl


@pytest.mark.parametrize("args, name", [
    (dict(indices=np.zeros((2, 3), np.float32)), "indices"),
    (dict(indices=np.zeros((), np.int32), weights=np.zeros((), np.float32)), "indices"),
    (dict(weights=np.zeros((2, 4), np.float32)), "weights"),
    (dict(weights=np.zeros((2, 3), np.int32)), "weights"),
    (dict(table=np.zeros((5,), np.float32)), "table"),
    (dict(table=np.zeros((5, 4), np.int32)), "table"),
    (dict(table=[[1, 2], [3]]), "table"),
    (dict(impl="fast"), "impl"),
])
def test_bad_inputs_name_the_argument(args, name):
    kw = dict(indices=np.zeros((2, 3), np.int32), weights=np.zeros((2, 3), np.float32),
              table=np.zeros((5, 4), np.float32), impl="xla")
    kw.update(args)
    with pytest.raises(ValueError, match=f"`{name}`"):
        embedding_bag(**kw)


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_kernels_lower(platform):
    """Forward and backward kernels lower for TPU (Mosaic) and CUDA (Triton), bf16 table."""
    reason = platform_unavailable(platform)
    if reason:
        pytest.skip(reason)
    layout, call = PLATFORMS[platform]
    i = jnp.zeros((2, 7, 32), jnp.int32)

    def loss(w, t):
        return jnp.sum(embedding_bag_pallas(i, w, t, backend=layout, interpret=False) ** 2)

    text = jax.jit(jax.grad(loss, (0, 1))).trace(
        jnp.zeros((2, 7, 32), jnp.float32), jnp.zeros((1000, 256), jnp.bfloat16)).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count(call) == 2       # the gather forward, the weight gradient backward
