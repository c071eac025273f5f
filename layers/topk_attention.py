"""Training-free top-k block attention (HiP-style) for a trained `attn` layer: each query block
attends to its own block, a local window and the `n` earlier key blocks that score highest for
it. No parameters: a switch on an existing checkpoint (`mixers.attn.topk_blocks`).

The selection is one-level, not HiP's hierarchical tree search: every key block is scored
once, by one of two rules (`score`, default "bound"):

* "mean": a key block's representative is the mean of its keys (after RoPE), per kv head; a
  query block's is the mean of its queries over the block and the GQA group of the kv head;
  the score is their dot product. Means enter as sums: per query the scale is the same for
  every candidate, so the ranking is the means' ranking.
* "bound": Quest's upper bound (Tang et al. 2024) from the key block's channel-wise minimum and
  maximum, Σ_d max(q_d · min_d, q_d · max_d) ≥ q · k for every key k of the block, taken at
  the query block's most favourable query and head of the group. One query that matches a block
  selects it: a needle a single query asks for is not averaged away by the block's other
  queries, as it is under "mean". It costs T · T / block_size dot products per head (the
  means: (T / block_size)²).

Only blocks entirely before the query block are candidates; the own block is always listed
(causal inside it).

Decode (one query at position p, a full cache) scores the cache's blocks before p's block by
the same rule with the query alone as its block, so a decode step may select other blocks than
the full forward's query block (whose score combines all its queries); prefill from position 0
selects exactly as the full forward.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import block_sparse_attention


def _block_sums(x, block_size: int):
    """[B, T, h, D] -> float32 (float64 for float64) [B, ceil(T / block_size), h, D]."""
    B, T = x.shape[:2]
    nb = -(-T // block_size)
    x = jnp.pad(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                ((0, 0), (0, nb * block_size - T), (0, 0), (0, 0)))
    return x.reshape(B, nb, block_size, *x.shape[2:]).sum(2)


SCORES = ("bound", "mean")


def _top(scores, candidate, n: int):
    """The indices of the n best candidates along the last axis, −1 where fewer exist."""
    n = min(n, scores.shape[-1])
    val, idx = jax.lax.top_k(jnp.where(candidate, scores, -jnp.inf), n)
    return jnp.where(val > -jnp.inf, idx, -1).astype(jnp.int32)


def _bound_scores(q, k, block_size: int):
    """[B, Hkv, T, NB]: each query's Quest bound on each key block (`score="bound"`), the
    largest over the heads of its GQA group. q [B, T, H, D], k [B, L, Hkv, D]."""
    B, T, H, D = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    nb = -(-L // block_size)
    acc = jnp.promote_types(k.dtype, jnp.float32)
    kp = lambda fill: jnp.pad(k.astype(acc), ((0, 0), (0, nb * block_size - L), (0, 0), (0, 0)),
                              constant_values=fill).reshape(B, nb, block_size, Hkv, D)
    kmax, kmin = kp(-jnp.inf).max(2), kp(jnp.inf).min(2)        # [B, NB, Hkv, D]
    qg = q.astype(acc).reshape(B, T, Hkv, H // Hkv, D)
    # Σ_d max(q_d min_d, q_d max_d): the max where q_d > 0, the min where q_d < 0.
    s = (jnp.einsum("bthgd,bjhd->bhtgj", jnp.maximum(qg, 0), kmax)
         + jnp.einsum("bthgd,bjhd->bhtgj", jnp.minimum(qg, 0), kmin))
    return s.max(3)


def select_blocks(q, k, n: int, block_size: int, score: str = "bound", query_mask=None):
    """int32 [B, Hkv, NQ, 1 + min(n, NQ − 1)], NQ = ceil(T / block_size): for each query
    block its own block, then the n earlier key blocks of highest `score`, −1 where there are
    fewer (the `block_indices` of `block_sparse_attention`). q [B, T, H, D], k [B, T, Hkv, D];
    only the queries where `query_mask` [T] is true (default: all) take part in the scores."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    nq = -(-T // block_size)
    blocks = jnp.arange(nq, dtype=jnp.int32)
    own = jnp.broadcast_to(blocks[:, None], (B, Hkv, nq, 1))
    if nq < 2:
        return own
    if query_mask is not None:
        q = jnp.where(query_mask[None, :, None, None], q, 0)
    if score == "bound":
        s = _bound_scores(q, k, block_size)
        if query_mask is not None:      # a zero query's bound is 0, not "no vote"
            s = jnp.where(query_mask[:, None], s, -jnp.inf)
        s = jnp.pad(s, ((0, 0), (0, 0), (0, nq * block_size - T), (0, 0)),
                    constant_values=-jnp.inf)
        scores = s.reshape(B, Hkv, nq, block_size, nq).max(3)
    else:
        qs = _block_sums(q, block_size).reshape(B, nq, Hkv, H // Hkv, D).sum(3)
        scores = jnp.einsum("bihd,bjhd->bhij", qs, _block_sums(k, block_size))
    return jnp.concatenate(
        [own, _top(scores, blocks[None, :] < blocks[:, None], min(n, nq - 1))], axis=-1)


def topk_block_attention(q, k, v, n: int, *, block_size: int, window: Optional[int],
                         score: str = "bound", query_mask=None, segment_ids=None,
                         impl: str = "auto"):
    """o [B, T, H, Dv]: causal attention of each query block to its own block, the last
    `window` tokens and its n selected earlier blocks (`select_blocks`, which `query_mask`
    goes to); `segment_ids` [B, T] keep packed documents apart (a selected block of another
    document is masked, not replaced)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    idx = select_blocks(q, k, n, block_size, score, query_mask)
    return block_sparse_attention(q, k, v, idx,
                                  block_size=block_size, window=window,
                                  segment_ids=segment_ids, impl=impl)


def decode_kv_positions(q, k_cache, pos, n: int, block_size: int, window: Optional[int],
                        score: str = "bound"):
    """int32 [B, Hkv, L]: for one query q [B, 1, H, D] at position `pos` and a full cache
    k_cache [B, L, Hkv, D] (slot = position), each slot's position where the query sees it —
    slots in the n selected earlier blocks (by `score`), in its own block, or fewer than
    `window` back, up to `pos` — and −1 elsewhere (the dense op's empty slot)."""
    B, L, Hkv, D = k_cache.shape
    H = q.shape[2]
    if score == "bound":
        scores = _bound_scores(q, k_cache, block_size)[:, :, 0]
    else:
        qs = q.astype(jnp.promote_types(q.dtype, jnp.float32)).reshape(B, Hkv, H // Hkv,
                                                                          D).sum(2)
        scores = jnp.einsum("bhd,bjhd->bhj", qs, _block_sums(k_cache, block_size))
    qb = pos // block_size
    sel = _top(scores, jnp.arange(scores.shape[-1]) < qb, n)
    slots = jnp.arange(L, dtype=jnp.int32)
    sb = slots // block_size
    seen = (sb[:, None] == sel[:, :, None, :]).any(-1) | (sb == qb)
    if window is not None:
        seen = seen | (pos - slots < window)
    return jnp.where(seen & (slots <= pos), slots, -1)
