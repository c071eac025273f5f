"""The sequential passes of the Pallas chunked scans on TPU (Mosaic).

Grid (batch·head, value tiles, chunks) with the chunk axis "arbitrary" (sequential): the
float32 state [K, BV] lives in a VMEM scratch across it, and each grid step does only the
state recurrence of one chunk (`chunk_math.state_step` / `state_step_bwd`); everything else
runs chunk-parallel (`scan_parallel`). Per-chunk reset flags and initial-state rows are
scalar-prefetched into SMEM and steer the index maps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import chunk_math
from .chunk_math import div, rem


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


def state_forward(cfg, k, u, w, extras, h0, reset, hidx):
    """As `scan_gpu.state_forward`."""
    pltpu, params = _params()
    sp = _specs(cfg, reverse=False)
    BH, T_pad, _ = k.shape
    NC, n, delta = cfg.NC, len(extras), cfg.spec.delta
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.spec.cd)
    ld = lambda r: r[...].astype(acc)

    def kernel(r_ref, s_ref, k_ref, u_ref, *rest):
        w_ref, rest = (rest[0], rest[1:]) if delta else (None, rest)
        ex_refs, (h0_ref, h_ref, *outs) = rest[:n], rest[n:]
        *vn_ref, fin_ref, S_scr = outs

        @pl.when(_resets(cfg, r_ref, reverse=False))
        def _():
            S_scr[...] = ld(h0_ref)

        S = S_scr[...]
        h_ref[...] = S.astype(h_ref.dtype)
        vn, S = chunk_math.state_step(cfg.spec, S, ld(k_ref), ld(u_ref),
                                      ld(w_ref) if delta else None, [ld(e) for e in ex_refs])
        if delta:
            vn_ref[0][...] = vn.astype(cd)
        S_scr[...] = S
        fin_ref[...] = S

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(BH, cfg.Vp // cfg.BV_seq, NC),
        in_specs=([sp["key"], sp["val"]] + ([sp["key"]] if delta else [])
                  + [sp[kd] for kd in cfg.kinds] + [sp["h0"]]),
        out_specs=[sp["states"]] + ([sp["val"]] if delta else []) + [sp["fin"]],
        scratch_shapes=[pltpu.VMEM((cfg.Kp, cfg.BV_seq), acc)])
    outs = pl.pallas_call(
        kernel, grid_spec=grid_spec, compiler_params=params, interpret=cfg.interpret,
        out_shape=([jax.ShapeDtypeStruct((BH, NC, cfg.Kp, cfg.Vp), cd)]
                   + ([jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), cd)] if delta else [])
                   + [jax.ShapeDtypeStruct((BH, NC if cfg.varlen else 1, cfg.Kp, cfg.Vp),
                                           acc)]),
        name=f"{'gdn' if delta else 'la'}_state_fwd_tpu",
    )(reset, hidx, k, u, *([w] if delta else []), *extras, h0)
    h, *rest = outs
    vn, fin = rest if delta else (u, rest[0])
    return h, vn, fin


def state_backward(cfg, q, k, w, extras, do, dvo, dfin, h0, reset, hidx):
    """As `scan_gpu.state_backward`."""
    pltpu, params = _params()
    sp = _specs(cfg, reverse=True)
    BH, T_pad, _ = q.shape
    NC, n, delta = cfg.NC, len(extras), cfg.spec.delta
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.spec.cd)
    ld = lambda r: r[...].astype(acc)

    def kernel(r_ref, s_ref, q_ref, k_ref, *rest):
        w_ref, rest = (rest[0], rest[1:]) if delta else (None, rest)
        ex_refs, rest = rest[:n], rest[n:]
        do_ref, rest = rest[0], rest[1:]
        dvo_ref, rest = (rest[0], rest[1:]) if delta else (None, rest)
        dfin_ref, dh_ref, dh0_ref, dS_scr = rest
        flag = _resets(cfg, r_ref, reverse=True)

        @pl.when(pl.program_id(2) == 0)
        def _():  # without packed sequences only the last chunk's state is an output
            dS_scr[...] = jnp.zeros(dS_scr.shape, acc) if cfg.varlen else ld(dfin_ref)

        dS = dS_scr[...] + ld(dfin_ref) if cfg.varlen else dS_scr[...]
        dh_ref[...] = dS.astype(cd)
        dS_in = chunk_math.state_step_bwd(
            cfg.spec, dS, ld(q_ref), ld(k_ref), ld(w_ref) if delta else None, ld(do_ref),
            ld(dvo_ref) if delta else None, [ld(e) for e in ex_refs])
        dS_scr[...] = jnp.where(flag, jnp.zeros_like(dS_in), dS_in)

        @pl.when(flag)
        def _():
            dh0_ref[...] = dS_in

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(BH, cfg.Vp // cfg.BV_seq, NC),
        in_specs=([sp["key"], sp["key"]] + ([sp["key"]] if delta else [])
                  + [sp[kd] for kd in cfg.kinds] + [sp["val"]]
                  + ([sp["val"]] if delta else []) + [sp["fin"]]),
        out_specs=[sp["states"], sp["h0"]],
        scratch_shapes=[pltpu.VMEM((cfg.Kp, cfg.BV_seq), acc)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, compiler_params=params, interpret=cfg.interpret,
        out_shape=[jax.ShapeDtypeStruct((BH, NC, cfg.Kp, cfg.Vp), cd),
                   jax.ShapeDtypeStruct(h0.shape, acc)],
        name=f"{'gdn' if delta else 'la'}_state_bwd_tpu",
    )(reset, hidx, q, k, *([w] if delta else []), *extras, do, *([dvo] if delta else []),
      dfin)
