"""Block-sparse attention in jnp (any backend): every query block at once, one step of a
`lax.scan` per table entry (its key block gathered for all query blocks together), online
softmax. The backward (in `blocks.attend`'s custom_vjp) is flash-style: a scan over the same
entries that recomputes the weights from the saved log-sum-exp, carries dq and scatter-adds
each entry's dk / dv into its key block. Memory O(T·D + T·bs) per head, never T².
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import block_math as bm


def _entry(cfg, k, v, codes, count, qseg, kseg, j):
    """Entry j of every query block: (its key block index [B, Hkv, NQ], k, v of that block
    [B, Hkv, NQ, bs, D], the visibility mask [B, Hkv, NQ, R, bs])."""
    code = codes[..., j]
    kb = code // 2
    idx = kb[..., None, None]
    kj = jnp.take_along_axis(k, idx, axis=2)
    vj = jnp.take_along_axis(v, idx, axis=2)
    i = jnp.arange(cfg.NQ, dtype=jnp.int32)[:, None, None]
    q_seg = k_seg = None
    if cfg.segments:
        q_seg = qseg[:, None]                                    # [B, 1, NQ, R, 1]
        k_seg = jnp.take_along_axis(kseg[:, None], idx, axis=2)  # [B, Hkv, NQ, 1, bs]
    ok = bm.visible(bm.query_positions(i, cfg.R, cfg.q_bs), bm.key_positions(idx, cfg.bs),
                    (code % 2 == 1)[..., None, None], (j < count)[..., None, None], cfg,
                    q_seg, k_seg)
    return kb, kj, vj, ok


def forward(cfg, q, k, v, codes, count, qseg, kseg):
    """(o [B, Hkv, NQ, R, Dv] in cfg.out, log-sum-exp [B, Hkv, NQ, R, 1])."""
    acc = jnp.dtype(cfg.acc)

    def step(carry, j):
        _, kj, vj, ok = _entry(cfg, k, v, codes, count, qseg, kseg, j)
        return bm.softmax_step(carry, q, kj, vj, ok, cfg), None

    init = bm.softmax_init(cfg.R, v.shape[-1], acc, q.shape[:3])
    carry, _ = jax.lax.scan(step, init, jnp.arange(cfg.L))
    o, lse = bm.softmax_finish(carry)
    return o.astype(cfg.out), lse


def backward(cfg, q, k, v, do, lse, delta, codes, count, qseg, kseg):
    """(dq, dk, dv) in the accumulation dtype, blocked like q, k, v."""
    acc = jnp.dtype(cfg.acc)
    B, Hkv = q.shape[:2]
    b = jnp.arange(B)[:, None, None]
    h = jnp.arange(Hkv)[None, :, None]

    def step(carry, j):
        dq, dk, dv = carry
        kb, kj, vj, ok = _entry(cfg, k, v, codes, count, qseg, kseg, j)
        p, ds = bm.probs_and_dscores(q, kj, vj, do, lse, delta, ok, cfg)
        dkj, dvj = bm.grad_kv(p, ds, q, do, cfg)
        return (dq + bm.grad_q(ds, kj, cfg), dk.at[b, h, kb].add(dkj),
                dv.at[b, h, kb].add(dvj)), None

    init = (jnp.zeros(q.shape, acc), jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
    (dq, dk, dv), _ = jax.lax.scan(step, init, jnp.arange(cfg.L))
    return dq, dk, dv
