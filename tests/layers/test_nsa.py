"""The nsa token mixer: prefill + a chunk + decode steps (a separate per-token implementation
with its own masks) equal the full forward in float64 at lengths where every branch and the block
selection matter, with and without the q/k/v short convs; packed documents starting on block boundaries equal each document alone;
gradients reach every parameter; bad settings name their field."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import registry
from layers.nsa import NSA, overlap_matrix, select_blocks
from mem_lm import ModelConfig

SMALL = dict(cmp_block=4, cmp_stride=2, sel_block=8, sel_blocks=2, window=6)


def make(dtype=jnp.float64, **kw):
    return NSA(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, init_std=0.3, dtype=dtype,
               impl="xla", **{**SMALL, **kw})


def init(layer, x, rng):
    """Random parameters of the layer's shapes (no compile of `init`'s forward)."""
    pos = jnp.arange(x.shape[1])[None]
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda x: layer.init(jax.random.PRNGKey(0), x, positions=pos), x))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        shapes)


@pytest.mark.parametrize("short_conv", [False, True])
def test_decode_equals_full_forward(x64, rng, short_conv):
    B, T, T0 = 2, 37, 13
    layer = make(use_short_conv=short_conv)
    x = jnp.asarray(rng.standard_normal((B, T, 16)))
    pos = jnp.arange(T)[None]
    params = init(layer, x, rng)
    full, _ = jax.jit(lambda p, x: layer.apply(p, x, positions=pos))(params, x)
    # One compile for the prefill, one for every step (a traced position).
    call = jax.jit(lambda x, cache, t: layer.apply(
        params, x, positions=t + jnp.arange(x.shape[1])[None], cache=cache, cache_pos=t))
    # A prefill (the parallel path), a chunk of the same length (steps; the same compile).
    y0, cache = call(x[:, :T0], layer.init_cache(B, T), jnp.int32(0))
    y1, cache = call(x[:, T0:2 * T0], cache, jnp.int32(T0))
    ys = [y0, y1]
    for t in range(2 * T0, T):
        y, cache = call(x[:, t:t + 1], cache, jnp.int32(t))
        ys.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, axis=1)), np.asarray(full),
                               atol=1e-10)


@pytest.mark.parametrize("short_conv", [False, True])
def test_packed_documents_on_block_boundaries(x64, rng, short_conv):
    T = 32
    layer = make(use_short_conv=short_conv)
    x = jnp.asarray(rng.standard_normal((1, T, 16)))
    seg = jnp.asarray([[1] * 8 + [2] * 16 + [3] * 8], jnp.int32)
    params = init(layer, x, rng)
    doc_pos = jnp.asarray([list(range(8)) + list(range(16)) + list(range(8))])
    apply = jax.jit(lambda x, pos, seg: layer.apply(params, x, positions=pos,
                                                    segment_ids=seg)[0])
    packed = apply(x, doc_pos, seg)
    # The documents alone, padded at the end to the packed length (causal: no effect).
    for s, e in ((0, 8), (8, 24), (24, 32)):
        alone = apply(jnp.pad(x[:, s:e], ((0, 0), (0, T - e + s), (0, 0))),
                      jnp.arange(T)[None], jnp.ones((1, T), jnp.int32))
        np.testing.assert_allclose(np.asarray(packed[:, s:e]), np.asarray(alone[:, :e - s]),
                                   atol=1e-10)


@pytest.mark.slow
def test_gradients_reach_every_parameter(rng):
    layer = make(jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 24, 16)), jnp.float32)
    pos = jnp.arange(24)[None]
    params = init(layer, x, rng)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x, positions=pos)[0] ** 2)))(
        params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(getattr(g, "value", g))
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_selection_rules():
    over = overlap_matrix(M=3, NS=2, l=4, d=2, bs=4)   # blocks at tokens 0-3, 2-5, 4-7
    np.testing.assert_allclose(over, [[1, 0], [0.5, 0.5], [0, 1]])
    imp = jnp.asarray([0.0, 0.3, 0.9, 0.2, 0.5, 0.1])
    sel = jax.jit(select_blocks, static_argnums=3)
    # Query block 4: blocks 0, 3, 4 always, then the most important of the rest (2); never 5.
    np.testing.assert_array_equal(np.sort(sel(imp, 4, 0, 4)), [0, 2, 3, 4])
    np.testing.assert_array_equal(sel(imp, 0, 0, 3), [0, -1, -1])
    # A document beginning in block 2: only blocks 2..4, the local ones first.
    np.testing.assert_array_equal(sel(imp, 4, 2, 2), [4, 3])


@pytest.mark.parametrize("field, value", [("sel_block", 48), ("cmp_stride", 3),
                                          ("num_kv_heads", 3), ("window", 0)])
def test_bad_settings_name_the_field(field, value):
    assert "nsa" in registry.names("token")
    with pytest.raises(ValueError, match=f"mixers.nsa.{field}"):
        ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, pattern=("nsa",),
                    mixers={"nsa": {field: value}})
