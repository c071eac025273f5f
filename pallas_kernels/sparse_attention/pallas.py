"""`impl="pallas"`: block-sparse flash attention as Pallas kernels, forward and backward.

Three kernels per layout, all built from `block_math` on the block layout of `blocks`
(q [B, Hkv, NQ, R = G·qbs, D]: a query block holds its whole GQA group; k, v [B, Hkv, NK,
bs, D]) and the block tables of `blocks` (sorted, deduplicated, live entries first):

  forward  per query block, online softmax over its table entries -> o, log-sum-exp
  dq       per query block, over the same entries: dq = Σ ds k
  dk, dv   per key block, over the (query block, entry) pairs that visit it (the transposed
           table): dk = Σ dsᵀ q, dv = Σ pᵀ do
(p recomputed from the log-sum-exp, ds = p ⊙ (do vᵀ − rowsum(do ⊙ o)); no atomics: each
output block is owned by one program).

Per-token selection (query blocks of qbs = 1 token, NSA's design): a forward / dq program is
one query token and kv head, its R = G rows the GQA group's heads, and it visits the key
blocks that token selected, each loaded by index; dk / dv programs walk the (token, entry)
pairs that visit their key block.

TPU (Mosaic): the table rides in SMEM as scalar prefetch and steers the BlockSpec index maps,
so each grid step DMAs exactly the listed block. Grid (B, Hkv, NQ, L) for forward and dq, the
entry axis "arbitrary" with the softmax state (forward) or dq (accumulated in its resident
output block) carried across it; grid (B, Hkv, E = NQ·L) for dk / dv, walking the pairs in
key-block order so each key block's outputs stay resident over its run and are zeroed at its
first pair. Entries past the live count repeat the last live block (no new DMA) and compute
nothing. Blocks are full in their last two dims, so any D and bs are legal layouts.
The prefetched tables are whole in SMEM: B·Hkv·NQ·L int32 for forward and dq, 2·B·Hkv·NQ·L
for dk / dv (at T = 64k, bs = 64, L = 25, B·Hkv = 8: 800 KiB), which may not fit a TPU's SMEM
at long lengths; not yet run on a TPU.

GPU (Pallas' Triton backend): one program per query block (forward, dq) or key block (dk,
dv) over the whole sequence's k / v (or q / do) of its (batch, kv head); it loads its index
vector and loops over its live entries only, loading each listed block by dynamic index.
A program takes at most GPU_ROWS of a query block's G·bs rows (forward and dq: a grid axis
of row tiles; dk / dv: an inner loop over them), so a large GQA group (NSA's 16 heads × 64)
does not become one huge tile. Triton needs power-of-two tensor shapes of at least 16 for
dots: D and Dv are zero-padded to powers of two >= 16, G to a power of two with G·qbs >= 16
(padded rows are dropped; per token, a group smaller than 16 heads is padded to 16 rows),
index vectors to powers of two; the block size must be at least 16.

Off-device both run in interpret mode (the tests run both layouts on CPU and lower both for
their hardware).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import block_math as bm
from .blocks import blocked, transposed_table
from ..common import default_backend, default_interpret, div, rem

GPU_WARPS = 4
GPU_ROWS = 128  # query rows per GPU program (a tile of a query block's G·bs rows)


def block_sparse_attention_pallas(q, k, v, block_indices, *, block_size, window, causal, scale,
                                  segment_ids, query_block_size: Optional[int] = None,
                                  backend: Optional[str] = None,
                                  interpret: Optional[bool] = None):
    """Validated inputs as for the other impls -> o in q's dtype. `backend` ("tpu" | "gpu")
    and `interpret` override the default device's choice."""
    backend = backend or default_backend()
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"`backend` must be 'tpu' or 'gpu', got {backend!r}")
    if backend == "gpu" and block_size < 16:
        raise ValueError(f"the GPU kernels need block_size >= 16 (Triton dots), got {block_size}")
    return blocked(q, k, v, block_indices, block_size=block_size, window=window, causal=causal,
                   scale=scale, segment_ids=segment_ids, impl="pallas", backend=backend,
                   interpret=default_interpret() if interpret is None else interpret,
                   query_block_size=query_block_size)


def forward(cfg, q, k, v, codes, count, qseg, kseg):
    return (_tpu_forward if cfg.backend == "tpu" else _gpu_forward)(
        cfg, q, k, v, codes, count, qseg, kseg)


def backward(cfg, q, k, v, do, lse, delta, codes, count, qseg, kseg):
    return (_tpu_backward if cfg.backend == "tpu" else _gpu_backward)(
        cfg, q, k, v, do, lse, delta, codes, count, qseg, kseg)


def _mask(cfg, i, kb, selected, qs_ref, ks_ref, rows=None, row0=0):
    return bm.visible(bm.query_positions(i, rows or cfg.R, cfg.q_bs, row0),
                      bm.key_positions(kb, cfg.bs), selected, True, cfg,
                      qs_ref[...] if cfg.segments else None,
                      ks_ref[...] if cfg.segments else None)


def _split(refs, n_in, cfg):
    """Kernel refs -> (q, k, v, the rest of the inputs, qseg, kseg, outputs and scratch)."""
    ins, rest = refs[:n_in], refs[n_in:]
    if cfg.segments:
        return ins[:-2], ins[-2], ins[-1], rest
    return ins, None, None, rest


def _seg_inputs(cfg, qseg, kseg, q_spec, k_spec):
    return ([qseg, kseg], [q_spec, k_spec]) if cfg.segments else ([], [])


# ----------------------------------------------------------------------------- TPU
def _tpu():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu


def _tpu_call(kernel, name, cfg, grid, semantics, prefetch, ins, in_specs, out_specs, outs,
              scratch=()):
    pltpu = _tpu()
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=list(scratch))
    return pl.pallas_call(
        kernel, grid_spec=spec, out_shape=outs, interpret=cfg.interpret, name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
    )(*prefetch, *ins)


def _tpu_query_specs(cfg, Hkv, D, Dv):
    """Index maps of the grid (b, h, i, j) over the forward table (prefetch c, n)."""
    NQ, L, R, bs = cfg.NQ, cfg.L, cfg.R, cfg.bs

    def kb(b, h, i, j, c):
        return div(c[((b * Hkv + h) * NQ + i) * L + j], 2)

    row = lambda b, h, i, j, c, n: (b, h, i, 0, 0)
    key = lambda b, h, i, j, c, n: (b, h, kb(b, h, i, j, c), 0, 0)
    return dict(
        q=pl.BlockSpec((None, None, None, R, D), row),
        rows=lambda w: pl.BlockSpec((None, None, None, R, w), row),
        k=pl.BlockSpec((None, None, None, bs, D), key),
        v=pl.BlockSpec((None, None, None, bs, Dv), key),
        qseg=pl.BlockSpec((None, None, R, 1), lambda b, h, i, j, c, n: (b, i, 0, 0)),
        kseg=pl.BlockSpec((None, None, 1, bs),
                          lambda b, h, i, j, c, n: (b, kb(b, h, i, j, c), 0, 0)))


def _tpu_entry(cfg, c_ref, n_ref, Hkv):
    """(query block i, entry j, its code, whether it is live) of the grid step."""
    b, h, i, j = (pl.program_id(a) for a in range(4))
    r = (b * Hkv + h) * cfg.NQ + i
    return i, j, c_ref[r * cfg.L + j], j < n_ref[r]


def _tpu_forward(cfg, q, k, v, codes, count, qseg, kseg):
    pltpu = _tpu()
    B, Hkv, NQ, R, D = q.shape
    Dv = v.shape[-1]
    acc = jnp.dtype(cfg.acc)
    sp = _tpu_query_specs(cfg, Hkv, D, Dv)
    n_in = 3 + 2 * cfg.segments

    def kernel(c_ref, n_ref, *refs):
        (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref, m_s, l_s, o_s) = _split(
            refs, n_in, cfg)
        i, j, code, live = _tpu_entry(cfg, c_ref, n_ref, Hkv)

        @pl.when(j == 0)
        def _():
            m_s[...], l_s[...], o_s[...] = bm.softmax_init(R, Dv, acc)

        @pl.when(live)
        def _():
            ok = _mask(cfg, i, div(code, 2), rem(code, 2) == 1, qs_ref, ks_ref)
            m_s[...], l_s[...], o_s[...] = bm.softmax_step(
                (m_s[...], l_s[...], o_s[...]), q_ref[...], k_ref[...], v_ref[...], ok, cfg)

        @pl.when(j == cfg.L - 1)
        def _():
            o, lse = bm.softmax_finish((m_s[...], l_s[...], o_s[...]))
            o_ref[...] = o.astype(o_ref.dtype)
            lse_ref[...] = lse

    segs, seg_specs = _seg_inputs(cfg, qseg, kseg, sp["qseg"], sp["kseg"])
    return _tpu_call(
        kernel, "block_sparse_fwd_tpu", cfg, (B, Hkv, NQ, cfg.L),
        ("parallel", "parallel", "parallel", "arbitrary"),
        [codes.reshape(-1), count.reshape(-1)], [q, k, v] + segs,
        [sp["q"], sp["k"], sp["v"]] + seg_specs, [sp["rows"](Dv), sp["rows"](1)],
        [jax.ShapeDtypeStruct((B, Hkv, NQ, R, Dv), jnp.dtype(cfg.out)),
         jax.ShapeDtypeStruct((B, Hkv, NQ, R, 1), acc)],
        [pltpu.VMEM((R, 1), acc), pltpu.VMEM((R, 1), acc), pltpu.VMEM((R, Dv), acc)])


def _tpu_backward(cfg, q, k, v, do, lse, delta, codes, count, qseg, kseg):
    B, Hkv, NQ, R, D = q.shape
    Dv = v.shape[-1]
    acc = jnp.dtype(cfg.acc)
    sp = _tpu_query_specs(cfg, Hkv, D, Dv)
    segs, seg_specs = _seg_inputs(cfg, qseg, kseg, sp["qseg"], sp["kseg"])
    n_in = 6 + 2 * cfg.segments

    def dq_kernel(c_ref, n_ref, *refs):
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), qs_ref, ks_ref, (dq_ref,) = _split(
            refs, n_in, cfg)
        i, j, code, live = _tpu_entry(cfg, c_ref, n_ref, Hkv)

        @pl.when(j == 0)
        def _():
            dq_ref[...] = jnp.zeros(dq_ref.shape, acc)

        @pl.when(live)
        def _():
            ok = _mask(cfg, i, div(code, 2), rem(code, 2) == 1, qs_ref, ks_ref)
            _, ds = bm.probs_and_dscores(q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                         lse_ref[...], dl_ref[...], ok, cfg)
            dq_ref[...] += bm.grad_q(ds, k_ref[...], cfg)

    dq = _tpu_call(
        dq_kernel, "block_sparse_dq_tpu", cfg, (B, Hkv, NQ, cfg.L),
        ("parallel", "parallel", "parallel", "arbitrary"),
        [codes.reshape(-1), count.reshape(-1)], [q, k, v, do, lse, delta] + segs,
        [sp["q"], sp["k"], sp["v"], sp["rows"](Dv), sp["rows"](1), sp["rows"](1)] + seg_specs,
        sp["q"], jax.ShapeDtypeStruct(q.shape, acc))

    kbT, qcT, nT, _, cnt = transposed_table(codes, count, cfg)
    E = kbT.shape[-1]

    def pair(b, h, e, ref):
        return ref[(b * Hkv + h) * E + e]

    key = lambda b, h, e, kt, qt, n: (b, h, pair(b, h, e, kt), 0, 0)
    rows = lambda b, h, e, kt, qt, n: (b, h, div(pair(b, h, e, qt), 2), 0, 0)
    kv_specs = [pl.BlockSpec((None, None, None, R, D), rows),
                pl.BlockSpec((None, None, None, cfg.bs, D), key),
                pl.BlockSpec((None, None, None, cfg.bs, Dv), key),
                pl.BlockSpec((None, None, None, R, Dv), rows)] + [
                pl.BlockSpec((None, None, None, R, 1), rows)] * 2
    if cfg.segments:
        kv_specs += [
            pl.BlockSpec((None, None, R, 1),
                         lambda b, h, e, kt, qt, n: (b, div(pair(b, h, e, qt), 2), 0, 0)),
            pl.BlockSpec((None, None, 1, cfg.bs),
                         lambda b, h, e, kt, qt, n: (b, pair(b, h, e, kt), 0, 0))]

    def dkv_kernel(kt_ref, qt_ref, n_ref, *refs):
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), qs_ref, ks_ref, (dk_ref, dv_ref) = \
            _split(refs, n_in, cfg)
        b, h, e = (pl.program_id(a) for a in range(3))
        kb, qc = pair(b, h, e, kt_ref), pair(b, h, e, qt_ref)

        @pl.when((e == 0) | (pair(b, h, jnp.maximum(e - 1, 0), kt_ref) != kb))
        def _():
            dk_ref[...] = jnp.zeros(dk_ref.shape, acc)
            dv_ref[...] = jnp.zeros(dv_ref.shape, acc)

        @pl.when(e < n_ref[b * Hkv + h])
        def _():
            ok = _mask(cfg, div(qc, 2), kb, rem(qc, 2) == 1, qs_ref, ks_ref)
            p, ds = bm.probs_and_dscores(q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                         lse_ref[...], dl_ref[...], ok, cfg)
            dk, dv = bm.grad_kv(p, ds, q_ref[...], do_ref[...], cfg)
            dk_ref[...] += dk
            dv_ref[...] += dv

    dk, dv = _tpu_call(
        dkv_kernel, "block_sparse_dkv_tpu", cfg, (B, Hkv, E),
        ("parallel", "parallel", "arbitrary"),
        [kbT.reshape(-1), qcT.reshape(-1), nT.reshape(-1)], [q, k, v, do, lse, delta] + segs,
        kv_specs, [kv_specs[1], kv_specs[2]],
        [jax.ShapeDtypeStruct(k.shape, acc), jax.ShapeDtypeStruct(v.shape, acc)])
    # A key block that no query block visits is never written.
    visited = (cnt > 0)[..., None, None]
    return dq, jnp.where(visited, dk, 0.0), jnp.where(visited, dv, 0.0)


# ----------------------------------------------------------------------------- GPU
def _pow2(n: int, least: int = 1) -> int:
    p = least
    while p < n:
        p *= 2
    return p


def _pad_last(x, n, fill=0):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])], constant_values=fill)


def _pad_group(x, cfg, Gp, fill=0):
    """Rows [.., G·qbs, w] -> [.., Gp·qbs, w]."""
    lead, w = x.shape[:-2], x.shape[-1]
    x = x.reshape(lead + (cfg.G, cfg.q_bs, w))
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, Gp - cfg.G), (0, 0), (0, 0)],
                constant_values=fill)
    return x.reshape(lead + (Gp * cfg.q_bs, w))


def _gpu_group(cfg) -> int:
    """G padded to a power of two, and so that a query block has >= 16 rows (Triton dots)."""
    return max(_pow2(cfg.G), 16 // min(cfg.q_bs, 16))


def _gpu_layout(cfg, q, k, v, qseg):
    """(kernel config, q, k, v, qseg) padded to Triton's shapes."""
    Gp = _gpu_group(cfg)
    Dp, Dvp = _pow2(q.shape[-1], 16), _pow2(v.shape[-1], 16)
    q = _pad_group(_pad_last(q, Dp), cfg, Gp)
    qseg = None if qseg is None else _pad_group(qseg, cfg, Gp, -1)
    return dataclasses.replace(cfg, G=Gp), q, _pad_last(k, Dp), _pad_last(v, Dvp), qseg


def _gpu_call(kernel, name, cfg, grid, ins, in_specs, out_specs, outs):
    from jax.experimental.pallas import triton as pltr
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=outs,
        interpret=cfg.interpret, name=name,
        compiler_params=pltr.CompilerParams(num_warps=GPU_WARPS, num_stages=2))(*ins)


def _gpu_table(codes, count):
    Lp = _pow2(codes.shape[-1])
    return _pad_last(codes, Lp, 0), count[..., None]


def _row_tile(cfg) -> int:
    return min(cfg.R, GPU_ROWS)


def _gpu_query_specs(cfg, NK, D, Dv):
    """Specs of the grid (b, h, i, row tile r): own rows of the query block, the whole
    sequence's k / v."""
    RT, bs = _row_tile(cfg), cfg.bs
    row = lambda b, h, i, r: (b, h, i, r, 0)
    whole = lambda b, h, i, r: (b, h, 0, 0, 0)
    return dict(
        rows=lambda w: pl.BlockSpec((None, None, None, RT, w), row),
        table=lambda w: pl.BlockSpec((None, None, None, w), lambda b, h, i, r: (b, h, i, 0)),
        k=pl.BlockSpec((None, None, NK, bs, D), whole),
        v=pl.BlockSpec((None, None, NK, bs, Dv), whole),
        qseg=pl.BlockSpec((None, None, RT, 1), lambda b, h, i, r: (b, i, r, 0)),
        kseg=pl.BlockSpec((None, NK, 1, bs), lambda b, h, i, r: (b, 0, 0, 0)))


def _gpu_entry(cfg, c_ref, j, k_ref, v_ref, ks_ref):
    """(key block, selected flag, its k, v and key segment ids) of entry j."""
    code = c_ref[j]
    kb = div(code, 2)
    return kb, rem(code, 2) == 1, k_ref[kb], v_ref[kb], ks_ref.at[kb] if cfg.segments else None


def _gpu_forward(cfg, q, k, v, codes, count, qseg, kseg):
    Dv = v.shape[-1]
    kcfg, q, k, v, qseg = _gpu_layout(cfg, q, k, v, qseg)
    B, Hkv, NQ, R, Dp = q.shape
    NK, Dvp = k.shape[2], v.shape[-1]
    acc = jnp.dtype(cfg.acc)
    codes, count = _gpu_table(codes, count)
    sp = _gpu_query_specs(kcfg, NK, Dp, Dvp)
    n_in = 5 + 2 * cfg.segments

    RT = _row_tile(kcfg)

    def kernel(*refs):
        (c_ref, n_ref, q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split(
            refs, n_in, kcfg)
        i, row0 = pl.program_id(2), pl.program_id(3) * RT
        qb = q_ref[...]

        def body(j, carry):
            kb, sel, kt, vt, ks = _gpu_entry(kcfg, c_ref, j, k_ref, v_ref, ks_ref)
            ok = _mask(kcfg, i, kb, sel, qs_ref, ks, RT, row0)
            return bm.softmax_step(carry, qb, kt, vt, ok, kcfg)

        carry = lax.fori_loop(0, n_ref[0], body, bm.softmax_init(RT, Dvp, acc))
        o, lse = bm.softmax_finish(carry)
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse

    segs, seg_specs = _seg_inputs(kcfg, qseg, kseg, sp["qseg"], sp["kseg"])
    table = sp["table"]
    o, lse = _gpu_call(
        kernel, "block_sparse_fwd_gpu", kcfg, (B, Hkv, NQ, R // RT),
        [codes, count, q, k, v] + segs,
        [table(codes.shape[-1]), table(1), sp["rows"](Dp), sp["k"], sp["v"]] + seg_specs,
        [sp["rows"](Dvp), sp["rows"](1)],
        [jax.ShapeDtypeStruct((B, Hkv, NQ, R, Dvp), jnp.dtype(cfg.out)),
         jax.ShapeDtypeStruct((B, Hkv, NQ, R, 1), acc)])
    return _unpad_rows(o, cfg, Dv), _unpad_rows(lse, cfg, 1)


def _unpad_rows(x, cfg, w):
    """Rows [.., Gp·bs, wp] padded by `_gpu_layout` -> [.., G·bs, w]."""
    lead = x.shape[:-2]
    x = x.reshape(lead + (-1, cfg.q_bs, x.shape[-1]))[..., :cfg.G, :, :w]
    return x.reshape(lead + (cfg.R, w))


def _gpu_backward(cfg, q, k, v, do, lse, delta, codes, count, qseg, kseg):
    D, Dv = q.shape[-1], v.shape[-1]
    kcfg, q, k, v, qseg = _gpu_layout(cfg, q, k, v, qseg)
    Gp = kcfg.G
    do = _pad_group(_pad_last(do, v.shape[-1]), cfg, Gp)
    lse, delta = _pad_group(lse, cfg, Gp), _pad_group(delta, cfg, Gp)
    B, Hkv, NQ, R, Dp = q.shape
    NK, Dvp = k.shape[2], v.shape[-1]
    acc = jnp.dtype(cfg.acc)
    sp = _gpu_query_specs(kcfg, NK, Dp, Dvp)
    segs, seg_specs = _seg_inputs(kcfg, qseg, kseg, sp["qseg"], sp["kseg"])
    n_in = 8 + 2 * cfg.segments

    RT = _row_tile(kcfg)

    def dq_kernel(*refs):
        (c_ref, n_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), qs_ref, ks_ref, \
            (dq_ref,) = _split(refs, n_in, kcfg)
        i, row0 = pl.program_id(2), pl.program_id(3) * RT
        qb, dob, lse_b, dl_b = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]

        def body(j, dq):
            kb, sel, kt, vt, ks = _gpu_entry(kcfg, c_ref, j, k_ref, v_ref, ks_ref)
            ok = _mask(kcfg, i, kb, sel, qs_ref, ks, RT, row0)
            _, ds = bm.probs_and_dscores(qb, kt, vt, dob, lse_b, dl_b, ok, kcfg)
            return dq + bm.grad_q(ds, kt, kcfg)

        dq_ref[...] = lax.fori_loop(0, n_ref[0], body, jnp.zeros((RT, Dp), acc))

    c_pad, n_pad = _gpu_table(codes, count)
    table = sp["table"]
    dq = _gpu_call(
        dq_kernel, "block_sparse_dq_gpu", kcfg, (B, Hkv, NQ, R // RT),
        [c_pad, n_pad, q, k, v, do, lse, delta] + segs,
        [table(c_pad.shape[-1]), table(1), sp["rows"](Dp), sp["k"], sp["v"], sp["rows"](Dvp),
         sp["rows"](1), sp["rows"](1)] + seg_specs,
        sp["rows"](Dp), jax.ShapeDtypeStruct(q.shape, acc))

    _, qcT, _, start, cnt = transposed_table(codes, count, cfg)
    qcT = _pad_last(qcT, _pow2(qcT.shape[-1]))
    own = lambda b, h, kb: (b, h, kb, 0, 0)
    whole = lambda w: pl.BlockSpec((None, None, NQ, R, w), lambda b, h, kb: (b, h, 0, 0, 0))
    per_key = pl.BlockSpec((None, None, None, 1), lambda b, h, kb: (b, h, kb, 0))
    dkv_specs = [per_key, per_key,
                 pl.BlockSpec((None, None, qcT.shape[-1]), lambda b, h, kb: (b, h, 0)),
                 whole(Dp), pl.BlockSpec((None, None, None, kcfg.bs, Dp), own),
                 pl.BlockSpec((None, None, None, kcfg.bs, Dvp), own),
                 whole(Dvp), whole(1), whole(1)]
    if cfg.segments:
        dkv_specs += [pl.BlockSpec((None, NQ, R, 1), lambda b, h, kb: (b, 0, 0, 0)),
                      pl.BlockSpec((None, None, 1, kcfg.bs), lambda b, h, kb: (b, kb, 0, 0))]

    def dkv_kernel(*refs):
        (s_ref, m_ref, qt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), qs_ref, ks_ref, \
            (dk_ref, dv_ref) = _split(refs, n_in + 1, kcfg)
        kb = pl.program_id(2)
        kt, vt, start_e = k_ref[...], v_ref[...], s_ref[0]

        def body(e, carry):
            qc = qt_ref[start_e + e]
            i, sel = div(qc, 2), rem(qc, 2) == 1

            def tile(t, carry):
                rows = pl.ds(pl.multiple_of(t * RT, RT), RT)
                qb, dob = q_ref[i, rows], do_ref[i, rows]
                ok = _mask(kcfg, i, kb, sel, qs_ref.at[i, rows] if cfg.segments else None,
                           ks_ref, RT, t * RT)
                p, ds = bm.probs_and_dscores(qb, kt, vt, dob, lse_ref[i, rows], dl_ref[i, rows],
                                             ok, kcfg)
                dk, dv = bm.grad_kv(p, ds, qb, dob, kcfg)
                return carry[0] + dk, carry[1] + dv

            return lax.fori_loop(0, R // RT, tile, carry)

        dk, dv = lax.fori_loop(0, m_ref[0], body, (jnp.zeros((kcfg.bs, Dp), acc),
                                                   jnp.zeros((kcfg.bs, Dvp), acc)))
        dk_ref[...] = dk
        dv_ref[...] = dv

    dk, dv = _gpu_call(
        dkv_kernel, "block_sparse_dkv_gpu", kcfg, (B, Hkv, NK),
        [start[..., None], cnt[..., None], qcT, q, k, v, do, lse, delta] + segs, dkv_specs,
        [dkv_specs[4], dkv_specs[5]],
        [jax.ShapeDtypeStruct(k.shape, acc), jax.ShapeDtypeStruct(v.shape, acc)])
    return _unpad_rows(dq, cfg, D), dk[..., :D], dv[..., :Dv]
