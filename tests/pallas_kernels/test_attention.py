"""Softmax attention op against a float64 loop over queries: causal, GQA, window, sinks,
segment ids, explicit positions (decode caches), gradients, bf16, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention


def loop_reference(q, k, v, *, causal=True, window=None, sinks=None, seg=None, q_pos=None,
                   kv_pos=None):
    """Independent float64 numpy reference, one query at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q_pos = np.arange(Tk - Tq, Tk) if q_pos is None else np.asarray(q_pos)
    kv_pos = np.arange(Tk) if kv_pos is None else np.asarray(kv_pos)
    o = np.zeros((B, Tq, H, v.shape[-1]))
    for b in range(B):
        for t in range(Tq):
            for h in range(H):
                hk = h // (H // Hkv)
                ok = kv_pos >= 0
                if causal:
                    ok &= kv_pos <= q_pos[t]
                if window is not None:
                    ok &= q_pos[t] - kv_pos < window
                if seg is not None:
                    ok &= seg[b] == seg[b, t]
                s = k[b, :, hk] @ q[b, t, h] / np.sqrt(D)
                logits = list(s[ok]) + ([float(sinks[h])] if sinks is not None else [])
                if not logits:
                    continue
                m = max(logits)
                w = np.exp(s[ok] - m)
                den = w.sum() + (np.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
                o[b, t, h] = (w / den) @ v[b, ok, hk]
    return o


def _qkv(rng, B, Tq, Tk, H, Hkv, D, dtype=np.float64):
    return (rng.standard_normal((B, Tq, H, D)).astype(dtype),
            rng.standard_normal((B, Tk, Hkv, D)).astype(dtype),
            rng.standard_normal((B, Tk, Hkv, D)).astype(dtype))


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("case", ["causal", "gqa_window_sinks", "segments", "noncausal"])
def test_matches_loop_reference(x64, rng, impl, case):
    B, T, H, Hkv, D = 2, 13, 4, 2, 8
    q, k, v = _qkv(rng, B, T, T, H, Hkv if case != "causal" else H, D)
    kw, ref_kw = {}, {}
    if case == "gqa_window_sinks":
        sinks = rng.standard_normal(H)
        kw = dict(window=3, sinks=jnp.asarray(sinks))
        ref_kw = dict(window=3, sinks=sinks)
    elif case == "segments":
        seg = np.array([[1] * 4 + [2] * 6 + [3] * 3, [0] * 2 + [5] * 11], np.int32)
        kw = dict(segment_ids=jnp.asarray(seg), window=5)
        ref_kw = dict(seg=seg, window=5)
    elif case == "noncausal":
        kw, ref_kw = dict(causal=False), dict(causal=False)
    # block_q=4 exercises the query blocks (and the window-sliced keys) of the xla impl.
    o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl, block_q=4, **kw)
    np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, **ref_kw), atol=1e-10)


def test_last_queries_of_longer_keys(x64, rng):
    """Tq < Tk with default positions: the queries are the last Tq tokens (window-sliced)."""
    q, k, v = _qkv(rng, 1, 9, 13, 2, 1, 4)
    for window in (None, 3):
        o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window, block_q=4)
        np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, window=window),
                                   atol=1e-10)


def test_positions_and_empty_slots(x64, rng):
    """Decode-cache style: 2 queries at positions 7, 8 against a ring of slots, some empty."""
    q, k, v = _qkv(rng, 1, 2, 6, 2, 1, 4)
    kv_pos = np.array([4, 5, 6, -1, 7, 8])
    q_pos = np.array([7, 8])
    for window in (None, 3):
        o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window,
                      q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos))
        ref = loop_reference(q, k, v, window=window, q_pos=q_pos, kv_pos=kv_pos)
        np.testing.assert_allclose(np.asarray(o), ref, atol=1e-10)
    # A query that sees nothing returns zeros.
    o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                  q_positions=jnp.asarray([0, 1]), kv_positions=jnp.asarray([2, 3, 4, 5, 6, 7]))
    np.testing.assert_array_equal(np.asarray(o), 0.0)


def test_gradients_xla_vs_reference(x64, rng):
    q, k, v = (jnp.asarray(a) for a in _qkv(rng, 1, 11, 11, 4, 2, 8))
    sinks = jnp.asarray(rng.standard_normal(4))
    w = jnp.asarray(rng.standard_normal((1, 11, 4, 8)))

    def loss(impl):
        return lambda q, k, v, s: jnp.sum(w * attention(q, k, v, sinks=s, window=4, impl=impl,
                                                        block_q=4))

    g_ref = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    for a, b in zip(g_ref, g_xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-10)


def test_bfloat16(rng):
    q, k, v = _qkv(rng, 1, 9, 9, 2, 2, 8, np.float32)
    o = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), block_q=4)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), loop_reference(q, k, v), atol=5e-2)


def test_bad_input_names_argument():
    q = jnp.zeros((1, 4, 3, 8))
    k = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="window"):
        attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="sinks"):
        attention(q, q, q, sinks=jnp.zeros(2))
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, q, q, segment_ids=jnp.zeros((1, 3), jnp.int32))
