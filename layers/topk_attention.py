"""Training-free top-k block attention (HiP-style) for a trained `attn` layer: each query block
attends to its own block, a local window and the `n` earlier key blocks that score highest for
it. No parameters: a switch on an existing checkpoint (`mixers.attn.topk_blocks`).

The selection is one-level, not HiP's hierarchical tree search: every key block is scored
once. A key block's representative is the mean of its keys (after RoPE), per kv head; a query
block's is the mean of its queries over the block and the GQA group of the kv head; the score
is their dot product. Only blocks entirely before the query block are candidates; the own
block is always listed (causal inside it). Means enter as sums: per query the scale is the
same for every candidate, so the ranking is the means' ranking.

Decode (one query at position p, a full cache) scores the cache's blocks before p's block by
the same rule with the query alone as its block's representative, so a decode step may select
other blocks than the full forward's query block (whose representative averages all its
queries); prefill from position 0 selects exactly as the full forward.
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


def _top(scores, candidate, n: int):
    """The indices of the n best candidates along the last axis, −1 where fewer exist."""
    n = min(n, scores.shape[-1])
    val, idx = jax.lax.top_k(jnp.where(candidate, scores, -jnp.inf), n)
    return jnp.where(val > -jnp.inf, idx, -1).astype(jnp.int32)


def select_blocks(q, k, n: int, block_size: int):
    """int32 [B, Hkv, NQ, 1 + min(n, NQ − 1)], NQ = ceil(T / block_size): for each query
    block its own block, then the n earlier key blocks of highest score, −1 where there are
    fewer (the `block_indices` of `block_sparse_attention`). q [B, T, H, D], k [B, T, Hkv, D]."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qs = _block_sums(q, block_size).reshape(B, -1, Hkv, H // Hkv, D).sum(3)
    ks = _block_sums(k, block_size)
    nq = qs.shape[1]
    blocks = jnp.arange(nq, dtype=jnp.int32)
    own = jnp.broadcast_to(blocks[:, None], (B, Hkv, nq, 1))
    if nq < 2:
        return own
    scores = jnp.einsum("bihd,bjhd->bhij", qs, ks)
    return jnp.concatenate(
        [own, _top(scores, blocks[None, :] < blocks[:, None], min(n, nq - 1))], axis=-1)


def topk_block_attention(q, k, v, n: int, *, block_size: int, window: Optional[int],
                         segment_ids=None, impl: str = "auto"):
    """o [B, T, H, Dv]: causal attention of each query block to its own block, the last
    `window` tokens and its n selected earlier blocks (`select_blocks`); `segment_ids` [B, T]
    keep packed documents apart (a selected block of another document is masked, not
    replaced)."""
    return block_sparse_attention(q, k, v, select_blocks(q, k, n, block_size),
                                  block_size=block_size, window=window,
                                  segment_ids=segment_ids, impl=impl)


def decode_kv_positions(q, k_cache, pos, n: int, block_size: int, window: Optional[int]):
    """int32 [B, Hkv, L]: for one query q [B, 1, H, D] at position `pos` and a full cache
    k_cache [B, L, Hkv, D] (slot = position), each slot's position where the query sees it —
    slots in the n selected earlier blocks, in its own block, or fewer than `window` back,
    up to `pos` — and −1 elsewhere (the dense op's empty slot)."""
    B, L, Hkv, D = k_cache.shape
    H = q.shape[2]
    qs = q.astype(jnp.promote_types(q.dtype, jnp.float32)).reshape(B, Hkv, H // Hkv, D).sum(2)
    ks = _block_sums(k_cache, block_size)
    qb = pos // block_size
    sel = _top(jnp.einsum("bhd,bjhd->bhj", qs, ks), jnp.arange(ks.shape[1]) < qb, n)
    slots = jnp.arange(L, dtype=jnp.int32)
    sb = slots // block_size
    seen = (sb[:, None] == sel[:, :, None, :]).any(-1) | (sb == qb)
    if window is not None:
        seen = seen | (pos - slots < window)
    return jnp.where(seen & (slots <= pos), slots, -1)
