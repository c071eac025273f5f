"""The chunk-parallel phases of the Pallas chunked scans: one program per (batch·head, chunk,
value tile), no order between them. The same kernels serve both backends (grid and blocks
are identical; only the compiler parameters differ), built from `chunk_math`.

Arrays are laid out [BH, T_pad, D] (tokens, D padded), chunk-boundary states [BH, NC, K, V].
A chunk's block of a token array is [C, D]; per-chunk columns ("kcol") are [K, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import common
from . import chunk_math


def compiler_params(cfg, ndim: int):
    """Every grid axis is independent here."""
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * ndim)
    from jax.experimental.pallas import triton as pltr
    return pltr.CompilerParams(num_warps=cfg.warps, num_stages=2)


def _specs(cfg, tiled: bool):
    """Blocks of one chunk for the grid (bh, c, iv) (`tiled`) or (bh, c) (all of V)."""
    C, Kp, BV = cfg.C, cfg.Kp, cfg.BV if tiled else cfg.Vp

    def m(f):  # index maps take (bh, c, iv) or (bh, c)
        return (lambda bh, c, iv: f(bh, c, iv)) if tiled else (lambda bh, c: f(bh, c, 0))

    part = {"key": pl.BlockSpec((None, None, C, Kp), m(lambda bh, c, iv: (iv, bh, c, 0))),
            "col": pl.BlockSpec((None, None, C, 1), m(lambda bh, c, iv: (iv, bh, c, 0))),
            "kcol": pl.BlockSpec((None, None, None, Kp, 1),
                                 m(lambda bh, c, iv: (iv, bh, c, 0, 0)))}
    return dict(
        key=pl.BlockSpec((None, C, Kp), m(lambda bh, c, iv: (bh, c, 0))),
        col=pl.BlockSpec((None, C, 1), m(lambda bh, c, iv: (bh, c, 0))),
        kcol=pl.BlockSpec((None, None, Kp, 1), m(lambda bh, c, iv: (bh, c, 0, 0))),
        val=pl.BlockSpec((None, C, BV), m(lambda bh, c, iv: (bh, c, iv))),
        state=pl.BlockSpec((None, None, Kp, BV), m(lambda bh, c, iv: (bh, c, 0, iv))),
        tri=pl.BlockSpec((None, C, C), m(lambda bh, c, iv: (bh, c, 0))),
        part=part)


def _call(cfg, kernel, name, tiled, in_specs, out_specs, out_shape, *args):
    BH, T_pad, _ = args[0].shape
    grid = (BH, cfg.NC, cfg.Vp // cfg.BV) if tiled else (BH, cfg.NC)
    return common.varying_call(lambda out_shape, *args: pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(cfg, len(grid)), interpret=cfg.interpret,
        name=f"{'gdn' if cfg.spec.delta else 'la'}_{name}_{cfg.backend}")(*args),
        out_shape, *args)


def _load(acc):
    return lambda r: r[...].astype(acc)


def ut_transform(cfg, k, v, extras):
    """(W [BH, T_pad, Kp], U [BH, T_pad, Vp]) in the matmul dtype and each chunk's UT inverse
    T as rows [BH, T_pad, C] in the accumulation dtype, all chunks at once."""
    sp = _specs(cfg, tiled=False)
    acc = jnp.dtype(cfg.acc)
    ld, n = _load(acc), len(extras)

    def kernel(k_ref, v_ref, *rest):
        ex_refs, (w_ref, u_ref, t_ref) = rest[:n], rest[n:]
        gt = cfg.spec.gates([ld(e) for e in ex_refs])
        w, u, t = chunk_math.ut_transform(cfg.spec, gt, ld(k_ref), ld(v_ref))
        w_ref[...] = w.astype(w_ref.dtype)
        u_ref[...] = u.astype(u_ref.dtype)
        t_ref[...] = t

    BH, T_pad, _ = k.shape
    cd = jnp.dtype(cfg.spec.cd)
    return _call(cfg, kernel, "ut", False,
                 [sp["key"], sp["val"]] + [sp[kd] for kd in cfg.kinds],
                 [sp["key"], sp["val"], sp["tri"]],
                 [jax.ShapeDtypeStruct((BH, T_pad, cfg.Kp), cd),
                  jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), cd),
                  jax.ShapeDtypeStruct((BH, T_pad, cfg.C), acc)],
                 k, v, *extras)


def output(cfg, q, k, vn, extras, h):
    """o [BH, T_pad, Vp] = Qe h[c] + P vn, all chunks at once."""
    sp = _specs(cfg, tiled=True)
    ld, n = _load(jnp.dtype(cfg.acc)), len(extras)

    def kernel(q_ref, k_ref, vn_ref, *rest):
        ex_refs, (h_ref, o_ref) = rest[:n], rest[n:]
        o = chunk_math.chunk_output(cfg.spec, ld(h_ref), ld(q_ref), ld(k_ref), ld(vn_ref),
                                    [ld(e) for e in ex_refs])
        o_ref[...] = o.astype(o_ref.dtype)

    BH, T_pad, _ = q.shape
    return _call(cfg, kernel, "out", True,
                 [sp["key"], sp["key"], sp["val"]] + [sp[kd] for kd in cfg.kinds]
                 + [sp["state"]],
                 sp["val"], jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), jnp.dtype(cfg.out)),
                 q, k, vn, *extras, h)


def intra_dv(cfg, q, k, do, extras):
    """Pᵀ do [BH, T_pad, Vp] (accumulation dtype), all chunks at once."""
    sp = _specs(cfg, tiled=True)
    ld, n = _load(jnp.dtype(cfg.acc)), len(extras)

    def kernel(q_ref, k_ref, do_ref, *rest):
        ex_refs, (dvo_ref,) = rest[:n], rest[n:]
        dvo_ref[...] = chunk_math.intra_dv(cfg.spec, ld(q_ref), ld(k_ref), ld(do_ref),
                                           [ld(e) for e in ex_refs]).astype(dvo_ref.dtype)

    BH, T_pad, _ = q.shape
    return _call(cfg, kernel, "dv_intra", True,
                 [sp["key"], sp["key"], sp["val"]] + [sp[kd] for kd in cfg.kinds],
                 sp["val"], jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), jnp.dtype(cfg.acc)),
                 q, k, do, *extras)


def chunk_grads(cfg, q, k, v, extras, h, tri, vn, do, dvo, dh):
    """Every chunk's input gradients at once, written out (`chunk_math.chunk_grads`): at its
    entering state h[c], with the cotangent dh[c] of its outgoing state, the forward's UT
    inverse tri and vn (delta rule: both residuals of the forward; dvo = Pᵀ do from
    `intra_dv`), else vn = v and Pᵀ do formed here. Value tiles give partial dq, dk and gate
    gradients, summed here. Returns (dq, dk, dv, dextras)."""
    sp = _specs(cfg, tiled=True)
    acc = jnp.dtype(cfg.acc)
    ld, n, delta = _load(acc), len(extras), cfg.spec.delta

    def kernel(q_ref, k_ref, v_ref, *rest):
        ex_refs, rest = rest[:n], rest[n:]
        t_ref = vn_ref = dvo_ref = None
        if delta:
            (t_ref, vn_ref, dvo_ref), rest = rest[:3], rest[3:]
        h_ref, do_ref, dh_ref, dq_ref, dk_ref, dv_ref = rest[:6]
        dex_refs = rest[6:]
        v = ld(v_ref)
        dq, dk, dv, dex = chunk_math.chunk_grads(
            cfg.spec, ld(h_ref), ld(dh_ref), ld(t_ref) if delta else None, ld(q_ref),
            ld(k_ref), v, ld(vn_ref) if delta else v, ld(do_ref),
            ld(dvo_ref) if delta else None, [ld(e) for e in ex_refs])
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv
        for r, d in zip(dex_refs, dex):
            r[...] = d

    BH, T_pad, _ = q.shape
    NV = cfg.Vp // cfg.BV
    outs = _call(
        cfg, kernel, "chunk_grads", True,
        [sp["key"], sp["key"], sp["val"]] + [sp[kd] for kd in cfg.kinds]
        + ([sp["tri"], sp["val"], sp["val"]] if delta else [])
        + [sp["state"], sp["val"], sp["state"]],
        [sp["part"]["key"]] * 2 + [sp["val"]] + [sp["part"][kd] for kd in cfg.kinds],
        [jax.ShapeDtypeStruct((NV, BH, T_pad, cfg.Kp), acc)] * 2
        + [jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), acc)]
        + [jax.ShapeDtypeStruct((NV,) + cfg.extra_shape(kd, BH, T_pad), acc)
           for kd in cfg.kinds],
        q, k, v, *extras, *([tri, vn, dvo] if delta else []), h, do, dh)
    dq, dk, dv, dex = outs[0].sum(0), outs[1].sum(0), outs[2], outs[3:]
    return dq, dk, dv, tuple(d.sum(0) for d in dex)
