"""The math of one (query block, key block) pair, written once for every blocked impl: the xla
path calls it on all query blocks at once (leading batch dims), the Pallas kernels on one
query block. Pure functions of arrays: no refs, no grids.

A query block holds the G query heads of one kv head stacked as R = G·qbs rows (head-major;
qbs = 1 for NSA's per-token selection: the group's heads are the rows),
so one key block is loaded once for its whole GQA group. A key is visible to a row when it
is a real token (position < T), not in the future (causal), in the row's segment, and either
its block was selected for the query block or it lies inside the sliding window.

Scores and softmax statistics are in the accumulation dtype; matmul operands are in the
compute dtype (bf16 for bf16 inputs).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..common import rem

# Masked scores: finite, so that exp(NEG - NEG) of a row that has seen nothing yet is 1, not NaN
# (the mask then zeroes it); any real score exceeds it.
NEG = -1e30


def mm(a, b, contract_a: int, contract_b: int, acc):
    """a · b contracting the given (last-two) axes, leading axes batched, result in `acc`."""
    n = a.ndim - 2
    batch = tuple(range(n))
    return lax.dot_general(a, b, (((n + contract_a,), (n + contract_b,)), (batch, batch)),
                           preferred_element_type=acc)


def query_positions(i, R: int, qbs: int, row0=0):
    """Token positions [.., R, 1] of rows row0 .. row0 + R − 1 of query block i (i scalar or
    [.., 1, 1]) of `qbs` tokens."""
    return i * qbs + rem(row0 + lax.broadcasted_iota(jnp.int32, (R, 1), 0), qbs)


def key_positions(kb, bs: int):
    """Token positions [.., 1, bs] of key block kb (scalar or [.., 1, 1])."""
    return kb * bs + lax.broadcasted_iota(jnp.int32, (1, bs), 1)


def visible(q_pos, k_pos, selected, live, cfg, q_seg=None, k_seg=None):
    """Boolean [.., R, bs]: which keys of the block each row attends to. `selected`: the block
    was listed for the query block (otherwise it is only a window block); `live`: the entry
    exists at all."""
    ok = (k_pos < cfg.T) & live
    if cfg.causal:
        ok = ok & (k_pos <= q_pos)
    if cfg.window is not None:
        ok = ok & (selected | (q_pos - k_pos < cfg.window))
    if cfg.segments:
        ok = ok & (q_seg == k_seg)
    return ok


def scores(q, k, cfg):
    acc = jnp.dtype(cfg.acc)
    return mm(q, k, 1, 1, acc) * jnp.asarray(cfg.scale, acc)


def softmax_step(carry, q, k, v, ok, cfg):
    """One key block into the running (max m [.., R, 1], denominator l [.., R, 1],
    numerator o [.., R, Dv]) of the online softmax."""
    m, l, o = carry
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.cd)
    s = jnp.where(ok, scores(q, k, cfg), NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    o = alpha * o + mm(p.astype(cd), v.astype(cd), 1, 0, acc)
    return m_new, l, o


def softmax_init(R: int, Dv: int, acc, lead=()):
    return (jnp.full(lead + (R, 1), NEG, acc), jnp.zeros(lead + (R, 1), acc),
            jnp.zeros(lead + (R, Dv), acc))


def softmax_finish(carry):
    """(o, log-sum-exp) of the rows; a row that saw no key gets o = 0."""
    m, l, o = carry
    seen = l > 0
    o = jnp.where(seen, o / jnp.where(seen, l, 1.0), 0.0)
    return o, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def probs_and_dscores(q, k, v, do, lse, delta, ok, cfg):
    """(p, ds) of one block pair for the backward: p = softmax weights recomputed from the
    saved log-sum-exp, ds = p ⊙ (do vᵀ − delta) with delta = rowsum(do ⊙ o)."""
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.cd)
    p = jnp.where(ok, jnp.exp(scores(q, k, cfg) - lse), 0.0)
    dp = mm(do.astype(cd), v.astype(cd), 1, 1, acc)
    return p, p * (dp - delta)


def grad_q(ds, k, cfg):
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.cd)
    return mm(ds.astype(cd), k.astype(cd), 1, 0, acc) * jnp.asarray(cfg.scale, acc)


def grad_kv(p, ds, q, do, cfg):
    """(dk [.., bs, D], dv [.., bs, Dv]) of one block pair."""
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.cd)
    dk = mm(ds.astype(cd), q.astype(cd), 0, 0, acc) * jnp.asarray(cfg.scale, acc)
    return dk, mm(p.astype(cd), do.astype(cd), 0, 0, acc)
