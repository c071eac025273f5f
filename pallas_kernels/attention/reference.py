"""Softmax attention, plain: materialise every score, repeat kv heads for GQA.

The slow, obvious form that the other impls are checked against (in float64).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.mask import attention_mask


def attention_reference(q, k, v, *, scale, causal, window, sinks, q_seg, kv_seg, q_pos, kv_pos,
                        prefix_k=None, prefix_v=None):
    acc = jnp.promote_types(q.dtype, jnp.float32)
    H, Hkv = q.shape[2], k.shape[2]
    mask = attention_mask(q_pos, kv_pos, causal=causal, window=window, q_seg=q_seg,
                          kv_seg=kv_seg)[:, None]
    if prefix_k is not None:   # keys every query sees, in front of the others
        B, P = q.shape[0], prefix_k.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(prefix_k.astype(k.dtype), (B,) + prefix_k.shape),
                             k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix_v.astype(v.dtype), (B,) + prefix_v.shape),
                             v], axis=1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:3] + (P,), bool), mask], axis=-1)
    k = jnp.repeat(k, H // Hkv, axis=2).astype(acc)
    v = jnp.repeat(v, H // Hkv, axis=2).astype(acc)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(acc), k) * scale
    neg = jnp.finfo(acc).min
    s = jnp.where(mask, s, neg)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(acc)[None, :, None, None]
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(m)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    return o.astype(q.dtype)
