"""Cascading KV cache for streaming attention (after Willette et al., "Training-Free Exact
Cascading KV Cache"): a fixed number of key/value slots that reaches further into the past
than a sliding window with attention sinks of the same size.

Slots, per batch row and layer (all shapes fixed, jit-able):

    [ sinks: the first `sinks` tokens, never evicted ]
    [ cascade 0: N slots ][ cascade 1: N slots ] ... [ cascade C−1: N slots ]
    [ pending 1 ] ... [ pending C−1 ]                 (one slot per cascade after the first)

Every new token enters cascade 0, a FIFO. When a FIFO is full its oldest token is evicted and
offered to the next cascade: the first offered token waits in that cascade's pending slot;
at the next offer the more important of the two (higher accumulated attention score; the
older one on a tie) enters the cascade's FIFO and the other is dropped. So cascade c keeps one
token of every 2^c, chosen by importance, and spans about 2^c times cascade 0's stretch of
the past. A token evicted from the last cascade is dropped. With one cascade this is the plain
sliding window with sinks (StreamingLLM), the baseline at equal size.

Importance: each slot's score is an exponential moving average of the attention mass it
receives, summed over heads: score ← score_decay · score + Σ_heads p (a new token starts
with the mass it gives itself). Decisions are per batch row, shared by the row's heads (one
position per slot keeps the cache one key set per row); the FIFO bookkeeping (counts, heads,
pending flags) is the same for every row, since exactly one token moves at each step whoever
wins.

Keys are stored with RoPE at their original positions (as the ring buffer does), so a query
sees old tokens at their true distance. Every token, prompt tokens included, is processed
one at a time (a `lax.scan`): the output of a prompt token is what streaming would give.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

ENTRY = ("k", "v", "pos", "score")                   # per slot
CASCADE_KEYS = ENTRY + ("count", "head", "pending")   # the whole cache


def cascade_layout(size: int, sinks: int, cascades: int) -> int:
    """Slots per cascade for a cache of `size` slots in all; ValueError when it cannot hold
    the sinks, the pending slots and at least one slot per cascade."""
    per = (size - sinks - (cascades - 1)) // cascades
    if sinks < 0 or cascades < 1 or per < 1:
        raise ValueError(f"a cascading cache of {size} slots cannot hold {sinks} sinks, "
                         f"{cascades - 1} pending slots and {cascades} cascades of >= 1 slot")
    return per


def init_cascade_cache(batch: int, size: int, num_kv_heads: int, head_dim: int, *,
                       sinks: int, cascades: int, dtype) -> dict:
    """An empty cache of `size` slots (cascades share what the sinks and pending slots leave;
    a remainder stays unused)."""
    per = cascade_layout(size, sinks, cascades)
    L = sinks + cascades * per + cascades - 1
    return {"k": jnp.zeros((batch, L, num_kv_heads, head_dim), dtype),
            "v": jnp.zeros((batch, L, num_kv_heads, head_dim), dtype),
            "pos": jnp.full((batch, L), -1, jnp.int32),
            "score": jnp.zeros((batch, L), jnp.float32),
            "count": jnp.zeros((cascades,), jnp.int32),
            "head": jnp.zeros((cascades,), jnp.int32),
            "pending": jnp.zeros((cascades - 1,), bool)}


def _read(cache, slot):
    return {n: jax.lax.dynamic_index_in_dim(cache[n], slot, axis=1, keepdims=False)
            for n in ENTRY}


def _write(cache, slot, entry, when):
    out = dict(cache)
    for n in ENTRY:
        old = jax.lax.dynamic_index_in_dim(cache[n], slot, axis=1, keepdims=False)
        new = jnp.where(when, entry[n].astype(old.dtype), old)
        out[n] = jax.lax.dynamic_update_index_in_dim(cache[n], new, slot, axis=1)
    return out


def _pick(which, a, b):
    """Per row: a where `which` [B], else b."""
    return {n: jnp.where(which.reshape(which.shape + (1,) * (a[n].ndim - 1)), a[n], b[n])
            for n in ENTRY}


def _insert(cache, entry, t, sinks: int):
    """Cache after token `entry` (at stream position t) enters: a sink while t < sinks, else
    cascade 0, evictions moving down the cascades."""
    C = cache["count"].shape[0]
    N = (cache["pos"].shape[1] - sinks - (C - 1)) // C
    cache = _write(cache, jnp.minimum(t, max(sinks - 1, 0)), entry, t < sinks)
    count, head, pending = cache["count"], cache["head"], cache["pending"]
    active = t >= sinks                       # the same for every row: a scalar
    for c in range(C):
        full = count[c] == N
        slot = sinks + c * N + jnp.where(full, head[c], (head[c] + count[c]) % N)
        evicted = _read(cache, slot)
        cache = _write(cache, slot, entry, active)
        count = count.at[c].add(jnp.where(active & ~full, 1, 0))
        head = head.at[c].set(jnp.where(active & full, (head[c] + 1) % N, head[c]))
        offered = active & full
        if c == C - 1:
            break
        pslot = sinks + C * N + c
        waiting = pending[c]
        candidate = _read(cache, pslot)
        # A second offer: the more important of the pair moves on, the pending slot empties.
        entry = _pick(evicted["score"] > candidate["score"], evicted, candidate)
        empty = {"k": candidate["k"], "v": candidate["v"],
                 "pos": jnp.full_like(candidate["pos"], -1),
                 "score": jnp.zeros_like(candidate["score"])}
        cache = _write(cache, pslot, _pick(jnp.broadcast_to(waiting, evicted["pos"].shape),
                                           empty, evicted), offered)
        pending = pending.at[c].set(jnp.where(offered, ~waiting, waiting))
        active = offered & waiting
    return {**cache, "count": count, "head": head, "pending": pending}


def cascade_attention(q, k, v, cache: dict, start, *, sinks: int, score_decay: float,
                      scale: Optional[float] = None, sink_logits=None):
    """Attention of q [B, T, H, D] over the cache and each token itself, T tokens in turn
    (their keys k, values v [B, T, Hkv, D] carry RoPE already), each then entering the
    cache; `start` is the stream position of the first. `sink_logits` [H]: learned logits
    that join each softmax's denominator with a zero value (layers.attention's `sinks`).
    Returns (o [B, T, H, D] in q's dtype, the cache after the T tokens)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc = jnp.promote_types(q.dtype, jnp.float32)

    def step(cache, x):
        q_t, k_t, v_t, t = x
        keys = jnp.concatenate([cache["k"], k_t[:, None].astype(cache["k"].dtype)], 1)
        vals = jnp.concatenate([cache["v"], v_t[:, None].astype(cache["v"].dtype)], 1)
        valid = jnp.concatenate([cache["pos"] >= 0, jnp.ones((B, 1), bool)], 1)
        s = jnp.einsum("bhgd,blhd->bhgl", q_t.reshape(B, Hkv, H // Hkv, D).astype(acc),
                       keys.astype(acc)) * scale
        s = jnp.where(valid[:, None, None], s, -jnp.inf)
        if sink_logits is not None:
            s = jnp.concatenate(
                [s, jnp.broadcast_to(sink_logits.astype(acc).reshape(1, Hkv, H // Hkv, 1),
                                     s.shape[:3] + (1,))], -1)
        p = jax.nn.softmax(s, axis=-1)[..., :keys.shape[1]]
        o = jnp.einsum("bhgl,blhd->bhgd", p, vals.astype(acc)).reshape(B, H, -1)
        mass = jnp.sum(p, axis=(1, 2))                                   # [B, L + 1]
        score = jnp.where(cache["pos"] >= 0, score_decay * cache["score"] + mass[:, :-1], 0)
        cache = {**cache, "score": score.astype(jnp.float32)}
        entry = {"k": k_t, "v": v_t, "pos": jnp.full((B,), t, jnp.int32),
                 "score": mass[:, -1].astype(jnp.float32)}
        return _insert(cache, entry, t, sinks), o.astype(q.dtype)

    ts = start + jnp.arange(T, dtype=jnp.int32)
    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), ts)
    cache, o = jax.lax.scan(step, cache, xs)
    return jnp.moveaxis(o, 0, 1), cache
