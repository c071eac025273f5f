"""The sequential passes of the Pallas chunked scans on TPU (Mosaic).

Grid (batch·head, value tiles, chunks) with the chunk axis "arbitrary" (sequential): the
float32 state [K, BV] lives in a VMEM scratch across it, and each grid step does only the
state recurrence of one chunk (`chunk_math.state_step` / `state_step_bwd`); everything else
runs chunk-parallel (`parallel`). Per-chunk reset flags and initial-state rows are
scalar-prefetched into SMEM and steer the index maps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import common
from ..common import div, rem
from . import chunk_math, operands


def _params():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu, pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))


def _specs(cfg, reverse: bool):
    """Index maps of the grid (bh, iv, c); `reverse` walks the chunks backwards."""
    H, NC, C, Kp, BV = cfg.H, cfg.NC, cfg.C, cfg.Kp, cfg.BV_seq

    def ch(c):
        return NC - 1 - c if reverse else c

    def h0_row(bh, c, s):  # initial-state row of the chunk's sequence, for head bh % H
        return s[div(bh, H) * NC + ch(c)] * H + rem(bh, H)

    states = pl.BlockSpec((None, None, Kp, BV), lambda bh, iv, c, r, s: (bh, ch(c), 0, iv))
    # Without packed sequences one resident block per (bh, tile): the last chunk's state.
    last = pl.BlockSpec((None, None, Kp, BV), lambda bh, iv, c, r, s: (bh, 0, 0, iv))
    return dict(
        key=pl.BlockSpec((None, C, Kp), lambda bh, iv, c, r, s: (bh, ch(c), 0)),
        col=pl.BlockSpec((None, C, 1), lambda bh, iv, c, r, s: (bh, ch(c), 0)),
        kcol=pl.BlockSpec((None, None, Kp, 1), lambda bh, iv, c, r, s: (bh, ch(c), 0, 0)),
        val=pl.BlockSpec((None, C, BV), lambda bh, iv, c, r, s: (bh, ch(c), iv)),
        h0=pl.BlockSpec((None, Kp, BV), lambda bh, iv, c, r, s: (h0_row(bh, c, s), 0, iv)),
        states=states, fin=states if cfg.varlen else last)


def _resets(cfg, r_ref, reverse):
    """Whether the grid step's chunk starts a sequence (loads / receives an initial state)."""
    bh, c = pl.program_id(0), pl.program_id(2)
    cc = cfg.NC - 1 - c if reverse else c
    return (cc == 0) | (r_ref[div(bh, cfg.H) * cfg.NC + cc] != 0)


def _call(cfg, kernel, name, ins, outs, reverse, reset, hidx):
    pltpu, params = _params()
    sp = _specs(cfg, reverse)
    BH = ins[0][0].shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(BH, cfg.Vp // cfg.BV_seq, cfg.NC),
        in_specs=[sp[kind] for _, kind in ins], out_specs=[sp[kind] for _, kind in outs],
        scratch_shapes=[pltpu.VMEM((cfg.Kp, cfg.BV_seq), jnp.dtype(cfg.acc))])
    return common.varying_call(lambda out_shape, *args: pl.pallas_call(
        kernel, grid_spec=grid_spec, compiler_params=params, interpret=cfg.interpret,
        out_shape=out_shape, name=f"{'gdn' if cfg.spec.delta else 'la'}_{name}_tpu",
    )(*args), [s for s, _ in outs], reset, hidx, *[x for x, _ in ins])


def state_forward(cfg, k, u, w, extras, h0, reset, hidx):
    """As `sequential_gpu.state_forward`."""
    acc, delta = jnp.dtype(cfg.acc), cfg.spec.delta
    ld = lambda r: r[...].astype(acc)

    def kernel(r_ref, s_ref, *refs):
        R, S_scr = operands.forward_refs(cfg, refs[:-1]), refs[-1]

        @pl.when(_resets(cfg, r_ref, reverse=False))
        def _():
            S_scr[...] = ld(R.h0)

        S = S_scr[...]
        R.h[...] = S.astype(R.h.dtype)
        vn, S = chunk_math.state_step(cfg.spec, S, ld(R.k), ld(R.u),
                                      ld(R.w) if delta else None, [ld(e) for e in R.extras])
        if delta:
            R.vn[...] = vn.astype(R.vn.dtype)
        S_scr[...] = S
        R.fin[...] = S

    ins, outs = operands.forward_io(cfg, k, u, w, extras, h0)
    outs = _call(cfg, kernel, "state_fwd", ins, outs, False, reset, hidx)
    return operands.forward_results(cfg, outs, u)


def state_backward(cfg, q, k, w, extras, do, dvo, dfin, h0, reset, hidx):
    """As `sequential_gpu.state_backward`."""
    acc, delta = jnp.dtype(cfg.acc), cfg.spec.delta
    ld = lambda r: r[...].astype(acc)

    def kernel(r_ref, s_ref, *refs):
        R, dS_scr = operands.backward_refs(cfg, refs[:-1]), refs[-1]
        flag = _resets(cfg, r_ref, reverse=True)

        @pl.when(pl.program_id(2) == 0)
        def _():  # without packed sequences only the last chunk's state is an output
            dS_scr[...] = jnp.zeros(dS_scr.shape, acc) if cfg.varlen else ld(R.dfin)

        dS = dS_scr[...] + ld(R.dfin) if cfg.varlen else dS_scr[...]
        R.dh[...] = dS.astype(R.dh.dtype)
        dS_in = chunk_math.state_step_bwd(
            cfg.spec, dS, ld(R.q), ld(R.k), ld(R.w) if delta else None, ld(R.do),
            ld(R.dvo) if delta else None, [ld(e) for e in R.extras])
        dS_scr[...] = jnp.where(flag, jnp.zeros_like(dS_in), dS_in)

        @pl.when(flag)
        def _():
            R.dh0[...] = dS_in

    ins, outs = operands.backward_io(cfg, q, k, w, extras, do, dvo, dfin, h0)
    return _call(cfg, kernel, "state_bwd", ins, outs, True, reset, hidx)
