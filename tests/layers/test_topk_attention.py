"""Training-free top-k block attention on `attn`: the sparse forward equals a float64 loop
reference in which every token selects key blocks by their means (or by Quest's bound) and
attends under the mask they give (odd length, GQA, packed documents); with every earlier block
selectable it is dense attention exactly, forward and prefill + decode; at real block sizes
prefill + decode equals the sparse forward (each step selects as the forward does); bad
settings name their field. Causality is tests/mem_lm/test_causality.py's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import Attention
from layers.topk_attention import topk_block_attention
from mem_lm import ModelConfig


def selected(query, key_blocks, n, score):
    """Indices of the n best-scoring key blocks [s, D] for one token's queries [G, D] (the
    heads of a kv head's group): "mean" ranks by the dot product of the means; "bound" by the
    largest over the heads of Σ_d max(q_d · min_d k, q_d · max_d k) over the block's keys."""
    if score == "mean":
        scores = [kb.mean(0) @ query.mean(0) for kb in key_blocks]
    else:
        scores = [np.maximum(query * kb.min(0), query * kb.max(0)).sum(-1).max()
                  for kb in key_blocks]
    return set(np.argsort(scores)[::-1][:n].tolist())


def reference(q, k, v, n, bs, window, seg=None, score="mean"):
    """Per token t: the n best of the key blocks before t's block, then softmax attention to
    them, t's own block and the window (causal, within t's document)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    o = np.zeros(q.shape[:3] + v.shape[-1:])
    for b in range(B):
        for h in range(Hkv):
            heads = slice(h * G, (h + 1) * G)
            for t in range(T):
                i = t // bs
                sel = selected(q[b, t, heads], [k[b, j * bs:(j + 1) * bs, h] for j in range(i)],
                               n, score)
                seen = [s for s in range(t + 1)
                        if (s // bs in sel or s // bs == i or t - s < window)
                        and (seg is None or seg[b, s] == seg[b, t])]
                logits = q[b, t, heads] @ k[b, seen, h].T / np.sqrt(D)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                o[b, t, heads] = (p / p.sum(-1, keepdims=True)) @ v[b, seen, h]
    return o


@pytest.mark.parametrize("score, packed", [("mean", False), ("mean", True), ("bound", True)])
def test_forward_matches_masked_reference_float64(x64, rng, score, packed):
    B, T, H, Hkv, D, bs, n, window = 2, 37, 4, 2, 8, 4, 2, 3
    q, k, v = (rng.standard_normal((B, T, h, D)) for h in (H, Hkv, Hkv))
    seg = np.repeat(np.array([[0, 1], [0, 0]]), [13, 24], axis=1) if packed else None
    o = topk_block_attention(q, k, v, n, block_size=bs, window=window, score=score,
                             segment_ids=None if seg is None else jnp.asarray(seg), impl="xla")
    want = reference(q, k, v, n, bs, window, seg, score)
    np.testing.assert_allclose(np.asarray(o), want, atol=1e-12)
    dense = reference(q, k, v, T, bs, window, seg)
    assert np.abs(np.asarray(o) - dense).max() > 1e-2     # the selection drops blocks that matter
    if score == "bound":    # and it is not the means' selection
        assert np.abs(want - reference(q, k, v, n, bs, window, seg, "mean")).max() > 1e-2


def make(**kw):
    return Attention(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, init_std=0.3,
                     dtype=jnp.float64, impl="xla", **kw)


def forward(layer, params, x):
    # Jitted like the steps: RoPE runs in float32, and eager and compiled float32 differ.
    return np.asarray(jax.jit(lambda x: layer.apply(
        params, x, positions=jnp.arange(x.shape[1])[None])[0])(x))


def run(layer, params, x, T0):
    """(full forward, prefill of T0 tokens + one decode step per further token)."""
    B, T, _ = x.shape
    call = jax.jit(lambda x, cache, t: layer.apply(
        params, x, positions=t + jnp.arange(x.shape[1])[None], cache=cache, cache_pos=t)[:2])
    y, cache = call(x[:, :T0], layer.init_cache(B, T), jnp.int32(0))
    ys = [y]
    for t in range(T0, T):
        y, cache = call(x[:, t:t + 1], cache, jnp.int32(t))
        ys.append(y)
    return forward(layer, params, x), np.asarray(jnp.concatenate(ys, axis=1))


def params_for(layer, x, rng):
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda x: layer.init(jax.random.PRNGKey(0), x, positions=jnp.arange(x.shape[1])[None]),
        x))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape)), shapes)


def test_every_block_selectable_is_dense(x64, rng):
    x = jnp.asarray(rng.standard_normal((2, 19, 16)))
    layer = make(topk_blocks=4, topk_block_size=4, topk_window=0)     # 5 blocks: all of them
    params = params_for(layer, x, rng)
    dense = forward(make(), params, x)
    full, steps = run(layer, params, x, T0=6)
    np.testing.assert_allclose(full, dense, atol=1e-12)
    np.testing.assert_allclose(steps, dense, atol=1e-12)


@pytest.mark.parametrize("score", ["mean", "bound"])
def test_prefill_and_decode_equal_sparse_forward(x64, rng, score):
    """Real blocks (4 blocks of 4 tokens, one selected, a one-token window), the prefill
    ending inside a block: every decode step selects what the forward selects for its token."""
    x = jnp.asarray(rng.standard_normal((2, 16, 16)))
    layer = make(topk_blocks=1, topk_block_size=4, topk_window=1, topk_score=score)
    params = params_for(layer, x, rng)
    full, steps = run(layer, params, x, T0=6)
    np.testing.assert_allclose(steps, full, atol=1e-12)
    dense = forward(make(), params, x)
    assert np.abs(full - dense).max() > 1e-3


@pytest.mark.parametrize("mixers, field", [
    ({"topk_blocks": -1}, "topk_blocks"),
    ({"topk_blocks": 2, "topk_block_size": 48}, "topk_block_size"),
    ({"topk_blocks": 2, "topk_window": -1}, "topk_window"),
    ({"topk_blocks": 2, "topk_score": "max"}, "topk_score"),
    ({"topk_blocks": 2, "sinks": True}, "topk_blocks"),
    ({"topk_blocks": 2, "cache": "cascade", "cache_size": 64}, "topk_blocks"),
])
def test_bad_settings_name_their_field(mixers, field):
    with pytest.raises(ValueError, match=f"mixers.attn.{field}"):
        ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, mixers={"attn": mixers})


def test_only_attn_has_topk_and_dense_is_the_default():
    cfg = ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2)
    assert cfg.settings("attn")["topk_blocks"] is None
    with pytest.raises(ValueError, match="topk_blocks"):
        ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, pattern=("swa",),
                    mixers={"swa": {"topk_blocks": 2}})
