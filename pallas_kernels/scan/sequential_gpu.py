"""The sequential passes of the Pallas chunked scans on GPU (Pallas' Triton backend).

One program per (batch·head, value tile) loops over the chunks (`fori_loop`) with the float32
state [K, BV] as the loop carry; each step does only the state recurrence (`chunk_math.
state_step` / `state_step_bwd`), everything else runs chunk-parallel (`parallel`). A
whole sequence is one block (a pointer into global memory; each step loads one chunk of it).
Per-chunk reset flags and initial-state rows arrive as small int32 arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .. import common
from ..common import div, rem
from . import chunk_math, operands


def _params(cfg):
    from jax.experimental.pallas import triton as pltr
    return pltr.CompilerParams(num_warps=cfg.warps_seq, num_stages=2)


def _specs(cfg, T_pad: int, n_rows: int, n_idx: int):
    NC, Kp, BV = cfg.NC, cfg.Kp, cfg.BV_seq
    states = pl.BlockSpec((None, NC, Kp, BV), lambda bh, iv: (bh, 0, 0, iv))
    return dict(
        key=pl.BlockSpec((None, T_pad, Kp), lambda bh, iv: (bh, 0, 0)),
        col=pl.BlockSpec((None, T_pad, 1), lambda bh, iv: (bh, 0, 0)),
        kcol=pl.BlockSpec((None, NC, Kp, 1), lambda bh, iv: (bh, 0, 0, 0)),
        val=pl.BlockSpec((None, T_pad, BV), lambda bh, iv: (bh, 0, iv)),
        h0=pl.BlockSpec((n_rows, Kp, BV), lambda bh, iv: (0, 0, iv)),
        idx=pl.BlockSpec((n_idx,), lambda bh, iv: (0,)),
        states=states,
        fin=states if cfg.varlen else pl.BlockSpec((None, 1, Kp, BV),
                                                   lambda bh, iv: (bh, 0, 0, iv)))


def _chunk_loader(cfg, acc):
    """Loads of chunk c (rows t) of token inputs, and its column of per-chunk inputs."""
    def load(refs, c, t):
        return [(r[c] if kd == "kcol" else r[t, :]).astype(acc)
                for r, kd in zip(refs, cfg.kinds)]
    return load


def _chunk_at(cfg, r_ref, s_ref, bh, c):
    """Chunk c of batch·head bh (the program id, read outside the chunk loop: interpret mode
    cannot lower it inside one): (whether it starts a sequence, the initial-state row of its
    sequence, its token rows)."""
    i = div(bh, cfg.H) * cfg.NC + c
    flag = (c == 0) | (r_ref[i] != 0)
    return flag, s_ref[i] * cfg.H + rem(bh, cfg.H), pl.ds(pl.multiple_of(c * cfg.C, cfg.C), cfg.C)


def _call(cfg, kernel, name, ins, outs, h0_rows, reset, hidx):
    BH, T_pad, _ = ins[0][0].shape
    sp = _specs(cfg, T_pad, h0_rows, reset.shape[0])
    return common.varying_call(lambda out_shape, *args: pl.pallas_call(
        kernel, grid=(BH, cfg.Vp // cfg.BV_seq), compiler_params=_params(cfg),
        interpret=cfg.interpret,
        in_specs=[sp["idx"], sp["idx"]] + [sp[kind] for _, kind in ins],
        out_specs=[sp[kind] for _, kind in outs], out_shape=out_shape,
        name=f"{'gdn' if cfg.spec.delta else 'la'}_{name}_gpu",
    )(*args), [s for s, _ in outs], reset, hidx, *[x for x, _ in ins])


def state_forward(cfg, k, u, w, extras, h0, reset, hidx):
    """(h [BH, NC, Kp, Vp]: the state entering each chunk, in the matmul dtype; vn (U − W S)
    [BH, T_pad, Vp] for the delta rule, else u; final states [BH, 1 or NC, Kp, Vp])."""
    NC, delta = cfg.NC, cfg.spec.delta
    acc = jnp.dtype(cfg.acc)
    load_extras = _chunk_loader(cfg, acc)

    def kernel(r_ref, s_ref, *refs):
        R = operands.forward_refs(cfg, refs)
        bh = pl.program_id(0)

        def body(c, S):
            flag, row, t = _chunk_at(cfg, r_ref, s_ref, bh, c)
            S = jnp.where(flag, R.h0[row].astype(acc), S)
            R.h[c] = S.astype(R.h.dtype)
            vn, S = chunk_math.state_step(
                cfg.spec, S, R.k[t, :].astype(acc), R.u[t, :].astype(acc),
                R.w[t, :].astype(acc) if delta else None, load_extras(R.extras, c, t))
            if delta:
                R.vn[t, :] = vn.astype(R.vn.dtype)
            if cfg.varlen:
                R.fin[c] = S
            return S

        S = lax.fori_loop(0, NC, body, jnp.zeros((cfg.Kp, cfg.BV_seq), acc))
        if not cfg.varlen:
            R.fin[0] = S

    ins, outs = operands.forward_io(cfg, k, u, w, extras, h0)
    outs = _call(cfg, kernel, "state_fwd", ins, outs, h0.shape[0], reset, hidx)
    return operands.forward_results(cfg, outs, u)


def state_backward(cfg, q, k, w, extras, do, dvo, dfin, h0, reset, hidx):
    """(dh [BH, NC, Kp, Vp]: the cotangent of each chunk's outgoing state, in the matmul
    dtype; dh0 [N·H, Kp, Vp]), walking the chunks in reverse."""
    NC, delta = cfg.NC, cfg.spec.delta
    acc = jnp.dtype(cfg.acc)
    load_extras = _chunk_loader(cfg, acc)

    def kernel(r_ref, s_ref, *refs):
        R = operands.backward_refs(cfg, refs)
        bh = pl.program_id(0)

        def body(j, dS):
            c = NC - 1 - j
            flag, row, t = _chunk_at(cfg, r_ref, s_ref, bh, c)
            if cfg.varlen:
                dS = dS + R.dfin[c].astype(acc)
            R.dh[c] = dS.astype(R.dh.dtype)
            dS_in = chunk_math.state_step_bwd(
                cfg.spec, dS, R.q[t, :].astype(acc), R.k[t, :].astype(acc),
                R.w[t, :].astype(acc) if delta else None, R.do[t, :].astype(acc),
                R.dvo[t, :].astype(acc) if delta else None, load_extras(R.extras, c, t))

            @pl.when(flag)
            def _():
                R.dh0[row] = dS_in

            return jnp.where(flag, jnp.zeros_like(dS_in), dS_in)

        # Without packed sequences only the last chunk's outgoing state is an output.
        init = (jnp.zeros((cfg.Kp, cfg.BV_seq), acc) if cfg.varlen
                else R.dfin[0].astype(acc))
        lax.fori_loop(0, NC, body, init)

    ins, outs = operands.backward_io(cfg, q, k, w, extras, do, dvo, dfin, h0)
    return _call(cfg, kernel, "state_bwd", ins, outs, h0.shape[0], reset, hidx)
