"""Cascading KV cache for streaming attention (Willette et al. 2024, "Training-Free Exponential
Context Extension via Cascading KV Cache"; reference code github.com/jeffwillette/
cascading_kv_cache, `cascade/models/cascading_cache.py` and `cascade_attention.py`): a fixed
number of key/value slots that reaches further into the past than a sliding window with
attention sinks of the same size.

Slots, per batch row and layer (all shapes fixed, jit-able):

    [ sinks: the first `sinks` tokens, never evicted ]
    [ cascade 0: N slots ][ cascade 1: N slots ] ... [ cascade C−1: N slots ]

Each cascade is a FIFO (a ring with a head index). Token t (stream position; the first
`sinks` tokens become the sinks) is offered to cascade 0, and a token a cascade evicts is
offered to the next one, under the reference's rule:

  * cascade c *accepts* the offer at step t when (t − sinks) is a multiple of 2^c (the
    reference's `pow2` clock): the token is appended, or, when the cascade is full, it takes
    the oldest token's slot and the oldest is offered to cascade c + 1 (dropped after the
    last cascade);
  * otherwise an empty cascade takes the token, and a non-empty one compares it with its
    newest token: the offered token replaces the newest when its importance is at least as
    high (ties go to the offered token), else it is dropped. The offer stops there.

So cascade c keeps about one token of every 2^c, chosen by importance, and spans about 2^c
times cascade 0's stretch of the past. With one cascade this is the plain sliding window with
sinks (StreamingLLM), the baseline at equal size.

`fill`: "eager" (the reference's default, `eager_fill=True`): every cascade accepts every
offer until the cache is full, i.e. while t <= sinks + C·N (the reference's bound, inclusive),
so the C·N slots first fill as one long window and selection starts only then; "lazy"
(`eager_fill=False`): the clock runs from the first token, so later cascades start selecting
while they are still filling.

Importance: each slot's score is an exponential moving average of the attention it receives,
averaged over the query heads (the reference's `homogeneous_heads` with `head_reduction=mean`):
score ← β·score + (1 − β)·mean_h p; a new token starts with (1 − β)·mean_h of the attention it
gives itself. β = `score_decay` (the reference's 0.9999). Decisions are per batch row, shared
by the row's heads; the FIFO bookkeeping (counts, heads) is the same for every row, since
whether a token moves on never depends on the scores.

`positions`: "cache" (the reference's default): keys are stored without RoPE and rotated at
each step by their place in the cache, as StreamingLLM does: the sinks at 0 … sinks − 1, then
the cascades from the oldest (C − 1) to the newest (0), each in FIFO order, and the query (and
its own key) at the number of cached tokens, so every distance stays below the cache size,
inside the training length. "stream" (the reference's `do_og_pos`): every key at its original
stream position and the query at t, so old tokens are seen at their true distance.

Every token, prompt tokens included, is processed one at a time (a `lax.scan`: the
reference's `cascade_stride=1`): the output of a prompt token is what streaming gives.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from layers.rope import apply_rope

POSITIONS = ("cache", "stream")
FILLS = ("eager", "lazy")
ENTRY = ("k", "v", "pos", "score")                   # per slot
CASCADE_KEYS = ENTRY + ("count", "head")             # the whole cache


def cascade_layout(size: int, sinks: int, cascades: int) -> int:
    """Slots per cascade for a cache of `size` slots in all; ValueError when it cannot hold
    the sinks and at least one slot per cascade."""
    per = (size - sinks) // cascades if cascades >= 1 else 0
    if sinks < 0 or per < 1:
        raise ValueError(f"a cascading cache of {size} slots cannot hold {sinks} sinks and "
                         f"{cascades} cascades of >= 1 slot")
    return per


def init_cascade_cache(batch: int, size: int, num_kv_heads: int, head_dim: int, *,
                       sinks: int, cascades: int, dtype) -> dict:
    """An empty cache of `size` slots (the cascades share what the sinks leave; a remainder
    stays unused). Keys are stored without RoPE."""
    L = sinks + cascades * cascade_layout(size, sinks, cascades)
    return {"k": jnp.zeros((batch, L, num_kv_heads, head_dim), dtype),
            "v": jnp.zeros((batch, L, num_kv_heads, head_dim), dtype),
            "pos": jnp.full((batch, L), -1, jnp.int32),
            "score": jnp.zeros((batch, L), jnp.float32),
            "count": jnp.zeros((cascades,), jnp.int32),
            "head": jnp.zeros((cascades,), jnp.int32)}


def _read(cache, slot):
    return {n: jax.lax.dynamic_index_in_dim(cache[n], slot, axis=1, keepdims=False)
            for n in ENTRY}


def _write(cache, slot, entry, when):
    """`entry` into `slot` of the rows where `when` (a scalar or [B])."""
    out = dict(cache)
    for n in ENTRY:
        old = jax.lax.dynamic_index_in_dim(cache[n], slot, axis=1, keepdims=False)
        w = jnp.reshape(when, jnp.shape(when) + (1,) * (old.ndim - jnp.ndim(when)))
        out[n] = jax.lax.dynamic_update_index_in_dim(
            cache[n], jnp.where(w, entry[n].astype(old.dtype), old), slot, axis=1)
    return out


def _accepts(since: jax.Array, c: int) -> jax.Array:
    """Whether cascade c accepts the offer `since` = t − sinks steps after the sinks: one step
    of every 2^c. (From c = 31 on, 2^c exceeds every int32 step, so only step 0 is one.)"""
    return since == 0 if c >= 31 else since % (1 << c) == 0


def _insert(cache, entry, t, sinks: int, fill: str):
    """Cache after token `entry` (at stream position t) enters: a sink while t < sinks, else
    offered to cascade 0 and on down, by the rule in the module docstring."""
    C = cache["count"].shape[0]
    N = (cache["pos"].shape[1] - sinks) // C
    cache = _write(cache, jnp.minimum(t, max(sinks - 1, 0)), entry, t < sinks)
    count, head = cache["count"], cache["head"]
    offered = t >= sinks                      # the same for every row: a scalar
    eager = (t <= sinks + C * N) if fill == "eager" else False
    for c in range(C):
        n, h = count[c], head[c]
        full = n == N
        # Append or push out the oldest (an accepting cascade, or an empty one) ...
        push = eager | _accepts(t - sinks, c) | (n == 0)
        # ... else the newest slot holds whichever of the two is more important.
        slot = sinks + c * N + jnp.where(push, (h + jnp.where(full, 0, n)) % N, (h + n - 1) % N)
        old = _read(cache, slot)
        cache = _write(cache, slot, entry, offered & (push | (entry["score"] >= old["score"])))
        count = count.at[c].add(jnp.where(offered & push & ~full, 1, 0))
        head = head.at[c].set(jnp.where(offered & push & full, (h + 1) % N, h))
        offered = offered & push & full       # the evicted oldest moves on
        entry = old
    return {**cache, "count": count, "head": head}


def _cascade_ranks(count, head, sinks: int, N: int, t):
    """[L] in-cache positions of the slots and the query's, before token t enters: sinks at
    0 … sinks − 1, then cascade C − 1 (the oldest tokens) … cascade 0, each oldest first; the
    query at the number of tokens held. Empty slots get positions too (they are masked)."""
    held_sinks = jnp.minimum(t, sinks)
    older = jnp.cumsum(count[::-1])[::-1] - count               # held by later cascades
    fifo = (jnp.arange(N)[None] - head[:, None]) % N            # [C, N]: age order
    ranks = jnp.concatenate([jnp.arange(sinks),
                             (held_sinks + older[:, None] + fifo).reshape(-1)])
    return ranks.astype(jnp.int32), (held_sinks + jnp.sum(count)).astype(jnp.int32)


def cascade_attention(q, k, v, cache: dict, start, *, sinks: int, score_decay: float,
                      positions: str, fill: str, rope_theta: float,
                      scale: Optional[float] = None, sink_logits=None):
    """Attention of q [B, T, H, D] over the cache and each token itself, T tokens in turn,
    each then entering the cache; `start` is the stream position of the first. q and keys
    k [B, T, Hkv, D] come *without* RoPE (v [B, T, Hkv, D]): the cache rotates them by
    `positions` ('cache' or 'stream', module docstring) with base `rope_theta`. `fill`:
    'eager' or 'lazy'. `sink_logits` [H]: learned logits that join each softmax's denominator
    with a zero value (layers.attention's `sinks`). Returns (o [B, T, H, D] in q's dtype, the
    cache after the T tokens)."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    N = (cache["pos"].shape[1] - sinks) // cache["count"].shape[0]
    scale = D ** -0.5 if scale is None else scale
    acc = jnp.promote_types(q.dtype, jnp.float32)
    rope = lambda x, p: apply_rope(x.astype(acc), p, rope_theta)

    def step(cache, x):
        q_t, k_t, v_t, t = x                                     # [B, H | Hkv, D], t scalar
        if positions == "cache":
            slot_pos, own = _cascade_ranks(cache["count"], cache["head"], sinks, N, t)
            slot_pos = jnp.broadcast_to(slot_pos, cache["pos"].shape)
        else:
            slot_pos, own = cache["pos"], t
        own = jnp.full((B, 1), own, jnp.int32)
        keys = jnp.concatenate([rope(cache["k"], slot_pos), rope(k_t[:, None], own)], 1)
        vals = jnp.concatenate([cache["v"], v_t[:, None].astype(cache["v"].dtype)], 1)
        valid = jnp.concatenate([cache["pos"] >= 0, jnp.ones((B, 1), bool)], 1)
        q_r = rope(q_t[:, None], own)[:, 0]
        s = jnp.einsum("bhgd,blhd->bhgl", q_r.reshape(B, Hkv, H // Hkv, D), keys) * scale
        s = jnp.where(valid[:, None, None], s, -jnp.inf)
        if sink_logits is not None:
            s = jnp.concatenate(
                [s, jnp.broadcast_to(sink_logits.astype(acc).reshape(1, Hkv, H // Hkv, 1),
                                     s.shape[:3] + (1,))], -1)
        p = jax.nn.softmax(s, axis=-1)[..., :keys.shape[1]]
        o = jnp.einsum("bhgl,blhd->bhgd", p, vals.astype(acc)).reshape(B, H, -1)
        mass = (1 - score_decay) * jnp.mean(p, axis=(1, 2))      # [B, L + 1]
        score = jnp.where(cache["pos"] >= 0, score_decay * cache["score"] + mass[:, :-1], 0)
        cache = {**cache, "score": score.astype(jnp.float32)}
        entry = {"k": k_t, "v": v_t, "pos": jnp.full((B,), t, jnp.int32),
                 "score": mass[:, -1].astype(jnp.float32)}
        return _insert(cache, entry, t, sinks, fill), o.astype(q.dtype)

    ts = start + jnp.arange(T, dtype=jnp.int32)
    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), ts)
    cache, o = jax.lax.scan(step, cache, xs)
    return jnp.moveaxis(o, 0, 1), cache
