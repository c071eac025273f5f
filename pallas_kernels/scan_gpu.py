"""The sequential passes of the Pallas chunked scans on GPU (Pallas' Triton backend).

One program per (batch·head, value tile) loops over the chunks (`fori_loop`) with the float32
state [K, BV] as the loop carry; each step does only the state recurrence (`chunk_math.
state_step` / `state_step_bwd`), everything else runs chunk-parallel (`scan_parallel`). A
whole sequence is one block (a pointer into global memory; each step loads one chunk of it).
Per-chunk reset flags and initial-state rows arrive as small int32 arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import chunk_math
from .chunk_math import div, rem


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


def state_forward(cfg, k, u, w, extras, h0, reset, hidx):
    """(h [BH, NC, Kp, Vp]: the state entering each chunk, in the matmul dtype; vn (U − W S)
    [BH, T_pad, Vp] for the delta rule, else u; final states [BH, 1 or NC, Kp, Vp])."""
    BH, T_pad, _ = k.shape
    H, NC, C, n, delta = cfg.H, cfg.NC, cfg.C, len(extras), cfg.spec.delta
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.spec.cd)
    sp = _specs(cfg, T_pad, h0.shape[0], reset.shape[0])
    load_extras = _chunk_loader(cfg, acc)

    def kernel(r_ref, s_ref, k_ref, u_ref, *rest):
        w_ref, rest = (rest[0], rest[1:]) if delta else (None, rest)
        ex_refs, (h0_ref, h_ref, *outs) = rest[:n], rest[n:]
        vn_ref, fin_ref = outs if delta else (None, outs[0])
        bh = pl.program_id(0)
        b, hh = div(bh, H), rem(bh, H)

        def body(c, S):
            i = b * NC + c
            flag = (c == 0) | (r_ref[i] != 0)
            S = jnp.where(flag, h0_ref[s_ref[i] * H + hh].astype(acc), S)
            h_ref[c] = S.astype(h_ref.dtype)
            t = pl.ds(pl.multiple_of(c * C, C), C)
            vn, S = chunk_math.state_step(
                cfg.spec, S, k_ref[t, :].astype(acc), u_ref[t, :].astype(acc),
                w_ref[t, :].astype(acc) if delta else None, load_extras(ex_refs, c, t))
            if delta:
                vn_ref[t, :] = vn.astype(vn_ref.dtype)
            if cfg.varlen:
                fin_ref[c] = S
            return S

        S = lax.fori_loop(0, NC, body, jnp.zeros((cfg.Kp, cfg.BV_seq), acc))
        if not cfg.varlen:
            fin_ref[0] = S

    out_specs = [sp["states"]] + ([sp["val"]] if delta else []) + [sp["fin"]]
    out_shape = ([jax.ShapeDtypeStruct((BH, NC, cfg.Kp, cfg.Vp), cd)]
                 + ([jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), cd)] if delta else [])
                 + [jax.ShapeDtypeStruct((BH, NC if cfg.varlen else 1, cfg.Kp, cfg.Vp), acc)])
    outs = pl.pallas_call(
        kernel, grid=(BH, cfg.Vp // cfg.BV_seq), compiler_params=_params(cfg),
        interpret=cfg.interpret,
        in_specs=([sp["idx"], sp["idx"], sp["key"], sp["val"]] + ([sp["key"]] if delta else [])
                  + [sp[kd] for kd in cfg.kinds] + [sp["h0"]]),
        out_specs=out_specs, out_shape=out_shape,
        name=f"{'gdn' if delta else 'la'}_state_fwd_gpu",
    )(reset, hidx, k, u, *([w] if delta else []), *extras, h0)
    h, *rest = outs
    vn, fin = rest if delta else (u, rest[0])
    return h, vn, fin


def state_backward(cfg, q, k, w, extras, do, dvo, dfin, h0, reset, hidx):
    """(dh [BH, NC, Kp, Vp]: the cotangent of each chunk's outgoing state, in the matmul
    dtype; dh0 [N·H, Kp, Vp]), walking the chunks in reverse."""
    BH, T_pad, _ = q.shape
    H, NC, C, n, delta = cfg.H, cfg.NC, cfg.C, len(extras), cfg.spec.delta
    acc, cd = jnp.dtype(cfg.acc), jnp.dtype(cfg.spec.cd)
    sp = _specs(cfg, T_pad, h0.shape[0], reset.shape[0])
    load_extras = _chunk_loader(cfg, acc)

    def kernel(r_ref, s_ref, q_ref, k_ref, *rest):
        w_ref, rest = (rest[0], rest[1:]) if delta else (None, rest)
        ex_refs, rest = rest[:n], rest[n:]
        do_ref, rest = rest[0], rest[1:]
        dvo_ref, rest = (rest[0], rest[1:]) if delta else (None, rest)
        dfin_ref, dh_ref, dh0_ref = rest
        bh = pl.program_id(0)
        b, hh = div(bh, H), rem(bh, H)

        def body(j, dS):
            c = NC - 1 - j
            i = b * NC + c
            flag = (c == 0) | (r_ref[i] != 0)
            if cfg.varlen:
                dS = dS + dfin_ref[c].astype(acc)
            dh_ref[c] = dS.astype(dh_ref.dtype)
            t = pl.ds(pl.multiple_of(c * C, C), C)
            dS_in = chunk_math.state_step_bwd(
                cfg.spec, dS, q_ref[t, :].astype(acc), k_ref[t, :].astype(acc),
                w_ref[t, :].astype(acc) if delta else None, do_ref[t, :].astype(acc),
                dvo_ref[t, :].astype(acc) if delta else None, load_extras(ex_refs, c, t))

            @pl.when(flag)
            def _():
                dh0_ref[s_ref[i] * H + hh] = dS_in

            return jnp.where(flag, jnp.zeros_like(dS_in), dS_in)

        # Without packed sequences only the last chunk's outgoing state is an output.
        init = (jnp.zeros((cfg.Kp, cfg.BV_seq), acc) if cfg.varlen
                else dfin_ref[0].astype(acc))
        lax.fori_loop(0, NC, body, init)

    return pl.pallas_call(
        kernel, grid=(BH, cfg.Vp // cfg.BV_seq), compiler_params=_params(cfg),
        interpret=cfg.interpret,
        in_specs=([sp["idx"], sp["idx"], sp["key"], sp["key"]] + ([sp["key"]] if delta else [])
                  + [sp[kd] for kd in cfg.kinds] + [sp["val"]]
                  + ([sp["val"]] if delta else []) + [sp["fin"]]),
        out_specs=[sp["states"], sp["h0"]],
        out_shape=[jax.ShapeDtypeStruct((BH, NC, cfg.Kp, cfg.Vp), cd),
                   jax.ShapeDtypeStruct(h0.shape, acc)],
        name=f"{'gdn' if delta else 'la'}_state_bwd_gpu",
    )(reset, hidx, q, k, *([w] if delta else []), *extras, do, *([dvo] if delta else []),
      dfin)
