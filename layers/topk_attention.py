"""Training-free top-k block attention (Quest / HiP-style) for a trained `attn` layer: each
query token attends to its own key block, a local window and the `n` earlier key blocks that
score highest for it. No parameters: a switch on an existing checkpoint
(`mixers.attn.topk_blocks`).

Selection is per query token, as Quest's is: token t ranks the key blocks that end before its
own block by its own query, so what t sees depends on tokens <= t only, and a decode step
selects exactly as the teacher-forced forward does. The heads of a GQA group share one
selection (one key block is loaded once per group), which the score takes into account by
the group's most favourable head ("bound") or the group's mean query ("mean").

The selection is one-level, not HiP's hierarchical tree search: every key block is scored
once, by one of two rules (`score`, default "bound"):

* "bound": Quest's upper bound (Tang et al. 2024) from the key block's channel-wise minimum and
  maximum (after RoPE), Σ_d max(q_d · min_d, q_d · max_d) ≥ q · k for every key k of the block,
  taken at the group's most favourable head. It costs T · T / block_size dot products per head.
* "mean": the dot product of the block's mean key with the query's mean over the group's
  heads. Means enter as sums: per query the scale is the same for every candidate, so the
  ranking is the means' ranking.

Attention is `block_sparse_attention` with one-token query blocks (`query_block_size=1`):
each token lists its own block and its selection, the op adds the window and keeps it causal.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import block_sparse_attention

SCORES = ("bound", "mean")


def _block_sums(x, block_size: int):
    """[B, T, h, D] -> float32 (float64 for float64) [B, ceil(T / block_size), h, D]."""
    B, T = x.shape[:2]
    nb = -(-T // block_size)
    x = jnp.pad(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                ((0, 0), (0, nb * block_size - T), (0, 0), (0, 0)))
    return x.reshape(B, nb, block_size, *x.shape[2:]).sum(2)


def _bound_scores(q, k, block_size: int):
    """[B, Hkv, Tq, NB]: each query's Quest bound on each key block (`score="bound"`), the
    largest over the heads of its GQA group. q [B, Tq, H, D], k [B, L, Hkv, D]."""
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


def _mean_scores(q, k, block_size: int):
    """[B, Hkv, Tq, NB]: the group's summed query · each key block's summed keys."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qs = q.astype(acc).reshape(B, T, Hkv, H // Hkv, D).sum(3)
    return jnp.einsum("bthd,bjhd->bhtj", qs, _block_sums(k, block_size))


def select_blocks(q, k, n: int, block_size: int, score: str = "bound", q_positions=None):
    """int32 [B, Hkv, Tq, 1 + min(n, NB)], NB = ceil(L / block_size): for each query its own
    key block, then the n key blocks of highest `score` among those that end before its own
    block begins, −1 where there are fewer. q [B, Tq, H, D] at positions `q_positions` [Tq]
    (default 0 .. Tq − 1), k [B, L, Hkv, D] at positions 0 .. L − 1; a query's selection
    depends only on itself and on keys before its block."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    B, Tq = q.shape[:2]
    pos = jnp.arange(Tq, dtype=jnp.int32) if q_positions is None else q_positions
    own = (pos // block_size).astype(jnp.int32)                               # [Tq]
    scores = (_bound_scores if score == "bound" else _mean_scores)(q, k, block_size)
    nb = scores.shape[-1]
    candidate = jnp.arange(nb)[None, :] < own[:, None]                         # [Tq, NB]
    top = min(n, nb)
    val, idx = jax.lax.top_k(jnp.where(candidate, scores, -jnp.inf), top)
    sel = jnp.where(val > -jnp.inf, idx, -1).astype(jnp.int32)
    own = jnp.broadcast_to(own[:, None], sel.shape[:3] + (1,))
    return jnp.concatenate([own, sel], axis=-1)


def topk_block_attention(q, k, v, n: int, *, block_size: int, window: Optional[int],
                         score: str = "bound", segment_ids=None, impl: str = "auto"):
    """o [B, T, H, Dv]: causal attention of each query token to its own key block, the last
    `window` tokens and its n selected earlier blocks (`select_blocks`); `segment_ids` [B, T]
    keep packed documents apart (a selected block of another document is masked, not
    replaced)."""
    idx = select_blocks(q, k, n, block_size, score)
    return block_sparse_attention(q, k, v, idx, block_size=block_size, query_block_size=1,
                                  window=window, segment_ids=segment_ids, impl=impl)


def decode_kv_positions(q, k_cache, pos, n: int, block_size: int, window: Optional[int],
                        score: str = "bound"):
    """int32 [B, Hkv, L]: for one query q [B, 1, H, D] at position `pos` and a full cache
    k_cache [B, L, Hkv, D] (slot = position), each slot's position where the query sees it —
    slots in its own block or its selection (`select_blocks`, as the forward selects), or
    fewer than `window` back, up to `pos` — and −1 elsewhere (the dense op's empty slot)."""
    L = k_cache.shape[1]
    sel = select_blocks(q, k_cache, n, block_size, score, jnp.reshape(pos, (1,)))[:, :, 0]
    slots = jnp.arange(L, dtype=jnp.int32)
    seen = (slots // block_size == sel[..., None]).any(-2)                     # [B, Hkv, L]
    if window is not None:
        seen = seen | (pos - slots < window)
    return jnp.where(seen & (slots <= pos), slots, -1)
