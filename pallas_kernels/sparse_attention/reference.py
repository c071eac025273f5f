"""Block-sparse attention, plain: the dense [T, T] mask of every listed block and the window,
then masked softmax over all scores, kv heads repeated. The slow, obvious form the other impls
are checked against (in float64)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.mask import attention_mask


def dense_mask(block_indices, *, T: int, block_size: int, query_block_size: int, window,
               causal, segment_ids):
    """Boolean [B, Hkv, T, T]: whether query token t attends to key token s."""
    NK = -(-T // block_size)
    listed = jnp.any(block_indices[..., None] == jnp.arange(NK), axis=-2)  # [B, Hkv, NQ, NK]
    t = jnp.arange(T)
    keep = listed[:, :, t // query_block_size][:, :, :, t // block_size]
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    if window is not None:
        keep = keep | attention_mask(pos, pos, causal=True, window=window, q_seg=None,
                                     kv_seg=None)[:, None]
    return keep & attention_mask(pos, pos, causal=causal, window=None, q_seg=segment_ids,
                                 kv_seg=segment_ids)[:, None]


def block_sparse_attention_reference(q, k, v, block_indices, *, block_size, window, causal,
                                     scale, segment_ids, query_block_size=None):
    acc = jnp.promote_types(q.dtype, jnp.float32)
    T, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    mask = dense_mask(block_indices, T=T, block_size=block_size,
                      query_block_size=query_block_size or block_size, window=window,
                      causal=causal, segment_ids=segment_ids)
    mask = jnp.repeat(mask, H // Hkv, axis=1)
    k = jnp.repeat(k, H // Hkv, axis=2).astype(acc)
    v = jnp.repeat(v, H // Hkv, axis=2).astype(acc)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(acc), k) * scale
    s = jnp.where(mask, s, jnp.finfo(acc).min)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v).astype(q.dtype)
