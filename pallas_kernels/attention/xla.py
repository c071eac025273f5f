"""Softmax attention in blocks of queries (jnp, any backend).

GQA without repeating kv. Long inputs are processed `block_q` queries at a time under
`jax.checkpoint`, so the score matrix held at once is [B, H, block_q, Tk] in the forward and
the backward: memory grows as O(T · block_q), not O(T²). For a sliding window with the default
(contiguous) positions — the queries being the last Tq of the Tk keys — each query block only
reads the `block_q + window - 1` keys it can see. Prefix keys/values (seen by every query)
join each block's keys.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from pallas_kernels.attention.mask import attention_mask


def _attend(q, k, v, *, scale, causal, window, sinks, q_seg, kv_seg, q_pos, kv_pos,
            prefix_k=None, prefix_v=None):
    """Grouped attention of q [B,Tq,H,D] against k/v [B,Tk,Hkv,D] (and the prefix [P,Hkv,D],
    visible to every query, in front)."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    qg = q.reshape(B, Tq, Hkv, G, D)
    mask = attention_mask(q_pos, kv_pos, causal=causal, window=window, q_seg=q_seg,
                          kv_seg=kv_seg)[:, None, None]
    if prefix_k is not None:
        P = prefix_k.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(prefix_k.astype(k.dtype), (B,) + prefix_k.shape),
                             k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix_v.astype(v.dtype), (B,) + prefix_v.shape),
                             v], axis=1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:4] + (P,), bool), mask], axis=-1)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc) * scale
    s = jnp.where(mask, s, jnp.finfo(acc).min)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(acc).reshape(1, Hkv, G, 1, 1)
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(m)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=acc)
    return o.reshape(B, Tq, H, v.shape[-1]).astype(q.dtype)


def attention_xla(q, k, v, *, scale, causal, window, sinks, q_seg, kv_seg, q_pos, kv_pos,
                  prefix_k=None, prefix_v=None, default_positions: bool = False,
                  block_q: int = 512):
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    kw = dict(scale=scale, causal=causal, window=window, sinks=sinks, prefix_k=prefix_k,
              prefix_v=prefix_v)
    if Tq <= block_q:
        return _attend(q, k, v, q_seg=q_seg, kv_seg=kv_seg, q_pos=q_pos, kv_pos=kv_pos, **kw)

    nb = -(-Tq // block_q)
    pad = nb * block_q - Tq

    def blocks(x, fill=0):
        if x is None:
            return None
        x = jnp.broadcast_to(x, (B,) + x.shape[1:]) if x.shape[0] == 1 else x
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape((B, nb, block_q) + x.shape[2:]), 1, 0)

    # Padded queries get position -1 (they see nothing and are dropped afterwards).
    xs = (blocks(q), blocks(q_pos, -1), blocks(q_seg, -1), jnp.arange(nb))
    sliced = window is not None and causal and default_positions and block_q + window - 1 < Tk
    span = block_q + (window or 0) - 1

    @jax.checkpoint
    def one(args):
        qb, qp, qs, i = args
        kb, vb, kp, ks = k, v, kv_pos, kv_seg
        if sliced:
            start = jnp.clip(Tk - Tq + i * block_q - window + 1, 0, Tk - span)
            kb = jax.lax.dynamic_slice_in_dim(k, start, span, axis=1)
            vb = jax.lax.dynamic_slice_in_dim(v, start, span, axis=1)
            kp = jax.lax.dynamic_slice_in_dim(kv_pos, start, span, axis=1)
            ks = None if kv_seg is None else jax.lax.dynamic_slice_in_dim(kv_seg, start, span, 1)
        return _attend(qb, kb, vb, q_seg=qs, kv_seg=ks, q_pos=qp, kv_pos=kp, **kw)

    o = jax.lax.map(one, xs)
    o = jnp.moveaxis(o, 0, 1).reshape((B, nb * block_q) + o.shape[3:])
    return o[:, :Tq]
