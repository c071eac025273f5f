"""The `titans` token mixer (layers/titans.py) on its own: both packed paths (the op's
cu_seqlens and the restarting token scan) equal each document alone, decoding and prefills that
start inside a chunk equal the full forward, and the layer is the op on its projections."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layers.titans as titans
from layers.titans import Titans

B, T, D_MODEL = 2, 11, 16


def make(rng, depth, chunk=3, **kw):
    layer = Titans(d_model=D_MODEL, num_heads=2, head_dim=4, depth=depth, expansion=2.0,
                   chunk_size=chunk, impl="xla", **kw)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)), jnp.float32)
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x, positions=None))
    return layer, params, x


def apply(layer, params, x, **kw):
    return layer.apply(params, x, positions=None, **kw)


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_packed_paths_equal_documents_alone(rng, depth, monkeypatch):
    """Documents of 4, 5 and 2 tokens (chunk 3: partial chunks, restarts mid-chunk of the
    row): the op with cu_seqlens (room for every document) and the token scan (room for one,
    so it falls back) both give each document's own forward."""
    layer, params, x = make(rng, depth)
    seg = jnp.asarray([[1] * 4 + [2] * 5 + [3] * 2] * B, jnp.int32)
    starts = (0, 4, 9, T)
    # Each document alone, at the start of its own row padded after it (causal): one call.
    docs = jnp.concatenate([jnp.pad(x[:, s:e], ((0, 0), (0, T - e + s), (0, 0)))
                            for s, e in zip(starts, starts[1:])])
    alone = jax.jit(lambda p, x: apply(layer, p, x)[0])(params, docs).reshape(3, B, T, -1)
    for capacity in (T, 1):
        monkeypatch.setattr(titans, "docs_per_row", lambda length, chunk: capacity)
        packed, _ = jax.jit(lambda p, x, s: apply(layer, p, x, segment_ids=s))(params, x, seg)
        for i, (s, e) in enumerate(zip(starts, starts[1:])):
            np.testing.assert_allclose(packed[:, s:e], alone[i, :, :e - s], atol=2e-5,
                                       rtol=2e-5, err_msg=f"capacity {capacity}, document {i}")


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_cached_prefills_and_decoding_equal_the_forward(rng, depth):
    """Through the cache: 3 tokens (a prefill from a chunk boundary: the chunked op), 4 tokens
    from position 3 (a boundary again), then 2 starting mid-chunk (the token scan), then one
    token at a time: the full forward's outputs."""
    layer, params, x = make(rng, depth)
    full, _ = apply(layer, params, x)
    cache = layer.init_cache(B, T)
    step = jax.jit(lambda p, x, c, pos: apply(layer, p, x, cache=c, cache_pos=pos))
    outs, pos = [], 0
    for n in (3, 4, 2, 1, 1):
        y, cache = step(params, x[:, pos:pos + n], cache, jnp.int32(pos))
        outs.append(y)
        pos += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


def test_depth2_initial_memory_is_learned_and_used(rng):
    """The depth-2 memory starts from per-head parameters (not zero) and the layer's output
    depends on them; gradients reach them."""
    layer, params, x = make(rng, 2)
    p = params["params"]
    assert p["memory_w1"].shape == (2, 4, 8) and p["memory_w2"].shape == (2, 8, 4)
    assert float(jnp.abs(p["memory_w1"]).max()) > 0 and float(jnp.abs(p["memory_w2"]).max()) > 0
    loss = lambda p: jnp.sum(apply(layer, p, x)[0] ** 2)
    g = jax.jit(jax.grad(loss))(params)["params"]
    assert float(jnp.abs(g["memory_w1"]).max()) > 0 and float(jnp.abs(g["memory_w2"]).max()) > 0
