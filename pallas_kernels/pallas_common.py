"""What the Pallas kernels of the chunked scans share: the chunk math (written once), the
custom_vjp, the token <-> kernel layout, and the two kernel skeletons (TPU and GPU).

Per (batch·head, value tile) a kernel walks the chunks of the sequence in order, keeping the
running state S [K, BV] in float32. Everything inside one chunk is a pure function of arrays,

    chunk_fn(S, q, k, v, *extras) -> (o [C, BV], S_next [K, BV])

(`la_chunk_fn`, `gdn_chunk_fn` below), used verbatim by both backends' forward kernels; the
backward kernels run the chunks in reverse and pull the cotangents (do, dS) back through
`jax.vjp(chunk_fn)` *inside the kernel*, recomputing the chunk from the state that entered it.
So the forward stores only chunk-boundary states ([BH, NC, K, V]), never a state per token.

Backends differ only in memory layout and block shapes:
  * TPU (Mosaic): grid (BH, V tiles, chunks) with the chunk axis "arbitrary" (sequential), the
    state in a VMEM scratch that persists across it, per-chunk reset flags and initial-state
    rows as scalar prefetch (SMEM) used by the index maps; K and V padded to 128 lanes.
  * GPU (Triton backend of Pallas): grid (BH, V tiles), the chunk loop is a `fori_loop` inside
    the kernel with the state as loop carry; K, V padded to powers of two (>= 16), V tiles of 64.
On CPU both run with `interpret=True` (the tests run both layouts).

Gates arrive as within-chunk cumulative log decays (computed outside the kernel, so their
gradient is plain autodiff there); every exponent taken in a kernel is of a non-positive number
(differences G_i - G_j are masked to i >= j before `exp`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import common

SUB = 16  # block of the UT forward substitution, and the chunk used with per-key gates


# ----------------------------------------------------------------------------- platform
def default_backend() -> str:
    """'tpu' or 'gpu' kernel layout for the current default device ('tpu' layout on CPU)."""
    plat = jax.default_backend()
    return "gpu" if plat in ("gpu", "cuda", "rocm") else "tpu"


def default_interpret() -> bool:
    """Interpret mode unless a TPU or GPU is the default device."""
    return jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")


# ----------------------------------------------------------------------------- chunk math
def _div(a, n):
    """a // n for non-negative integer a (plain truncating division: Mosaic lowers `//` on
    signed ints through `sign`, which needs a TPU to be present)."""
    return lax.div(a, jnp.asarray(n, jnp.asarray(a).dtype))


def _rem(a, n):
    return lax.rem(a, jnp.asarray(n, jnp.asarray(a).dtype))


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(a, b, cd, ta, tb):
    acc = jnp.promote_types(cd, jnp.float32)
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    prec = None if cd == jnp.bfloat16 else lax.Precision.HIGHEST
    return lax.dot_general(a.astype(cd), b.astype(cd), dims, precision=prec,
                           preferred_element_type=acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mm_vjp(a, b, cd, ta, tb):
    return _dot(a, b, cd, ta, tb)


def _mm_fwd(a, b, cd, ta, tb):
    return _dot(a, b, cd, ta, tb), (a, b)


def _mm_bwd(cd, ta, tb, res, dc):
    # C = op(a) op(b): d op(a) = dC op(b)^T, d op(b) = op(a)^T dC, with the same operand dtype
    # as the forward (Triton wants both operands of a dot in one dtype).
    a, b = res
    da = _dot(b, dc, cd, tb, True) if ta else _dot(dc, b, cd, False, not tb)
    db = _dot(dc, a, cd, True, ta) if tb else _dot(a, dc, cd, not ta, False)
    return da.astype(a.dtype), db.astype(b.dtype)


_mm_vjp.defvjp(_mm_fwd, _mm_bwd)


def _mm_diff(a, b, cd, *, ta=False, tb=False):
    """a @ b (a or b transposed on request) with operands in `cd`, accumulated in float32 or
    float64 (f32 operands get full precision, so a TPU does not round them to bf16).
    This one is for code that `jax.vjp` differentiates inside a kernel."""
    return _mm_vjp(a, b, jnp.dtype(cd), ta, tb)


def _mm_plain(a, b, cd, *, ta=False, tb=False):
    """As `_mm_diff`, without the custom_vjp (Triton cannot lower it undifferentiated)."""
    return _dot(a, b, jnp.dtype(cd), ta, tb)


def _row(col):
    """[C, 1] -> [1, C] without a transpose (a masked reduction, fine on every backend)."""
    C = col.shape[0]
    eye = _iota((C, C), 0) == _iota((C, C), 1)
    return jnp.sum(jnp.where(eye, col, 0), axis=0, keepdims=True)


def _last_row(x):
    """x[-1:] of a [C, D] value, as a masked reduction."""
    C = x.shape[0]
    return jnp.sum(jnp.where(_iota(x.shape, 0) == C - 1, x, 0), axis=0, keepdims=True)


def _masked_exp(diff, mask):
    """exp(diff) where mask, else 0; the exponent is masked first (no exp of a positive)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0)), 0)


def _ut_inverse(L, block: int):
    C = L.shape[0]
    b = min(block, C)
    dt = L.dtype
    r, c = _iota((C, C), 0), _iota((C, C), 1)
    eye = (r == c).astype(dt)
    same = _div(r, b) == _div(c, b)
    Ld = jnp.where(same, L, 0)

    def step(i, T):  # row i of every diagonal block; rows above it are final already
        return jnp.where(_rem(r, b) == i, eye - _mm_plain(Ld, T, dt), T)

    T = lax.fori_loop(1, b, step, eye)  # row 0 of every block is e_r
    if C > b:
        N = -_mm_plain(T, jnp.where(same, 0, L), dt)
        P, Np = eye + N, N
        nb = C // b
        p = 2
        while p < nb:
            Np = _mm_plain(Np, Np, dt)
            P = _mm_plain(P, eye + Np, dt)
            p *= 2
        T = _mm_plain(P, T, dt)
    return T


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def ut_inverse(L, block: int = SUB):
    """(I + L)^-1 for a strictly lower-triangular L [C, C], by blocked forward substitution.

    The diagonal blocks (size `block`) are inverted together, one row of every block per loop
    step (I + L_d is block diagonal); the off-diagonal blocks are then merged with matmuls:
    (I + L)^-1 = (I + D L_o)^-1 D with D = (I + L_d)^-1, and N = -D L_o is block-nilpotent,
    so (I + D L_o)^-1 = prod_p (I + N^(2^p)). All matmuls at full precision.
    Its gradient is closed-form (dL = -Tᵀ dT Tᵀ below the diagonal), so a backward kernel
    never differentiates through the substitution loop.
    """
    return _ut_inverse(L, block)


def _ut_inverse_fwd(L, block):
    T = _ut_inverse(L, block)
    return T, T


def _ut_inverse_bwd(block, T, dT):
    C = T.shape[0]
    dt = T.dtype
    dL = -_dot(_dot(T, dT, dt, True, False), T, dt, False, True)
    return (jnp.where(_iota((C, C), 0) > _iota((C, C), 1), dL, 0),)


ut_inverse.defvjp(_ut_inverse_fwd, _ut_inverse_bwd)


def la_chunk_fn(*, has_g: bool, has_gk: bool, scale: float, cd, diff: bool = False):
    """One chunk of linear attention: (S, q, k, v, [G], [Gk]) -> (o, S_next).

    S [K, BV]; q, k [C, K]; v [C, BV]; G [C, 1] / Gk [C, K]: within-chunk cumulative log
    decays (non-increasing); with Gk also its last row as a column [K, 1] (given, so that no
    kernel transposes a row: a [K, K] select would crowd a GPU's registers). All values in the accumulation dtype; matmul operands in `cd`."""

    mm = _mm_diff if diff else _mm_plain

    def fn(S, q, k, v, *extras):
        extras = list(extras)
        G = extras.pop(0) if has_g else None
        Gk = extras.pop(0) if has_gk else None
        Gk_last = extras.pop(0) if has_gk else None   # [K, 1]: Gk's last row, as a column
        C = q.shape[0]
        causal = _iota((C, C), 0) >= _iota((C, C), 1)
        q = q * scale
        if Gk is not None:
            if G is not None:
                Gk = Gk + G
            # A_ij = sum_k q_ik k_jk exp(Gk_ik - Gk_jk), i >= j: elementwise over [C, C, K]
            # (the per-key chunk is small, SUB), exponents masked to i >= j first.
            m3 = causal[:, :, None]
            diff = Gk[:, None, :] - Gk[None, :, :]
            A = jnp.sum(q[:, None, :] * k[None, :, :] * _masked_exp(diff, m3), axis=-1)
            last = _last_row(Gk)                        # [1, K]
            q_s = q * jnp.exp(Gk)
            k_s = k * jnp.exp(last - Gk)
            if G is not None:
                Gk_last = Gk_last + _last_row(G)
            S_dec = jnp.exp(Gk_last) * S
        elif G is not None:
            A = mm(q, k, cd, tb=True) * _masked_exp(G - _row(G), causal)
            last = _last_row(G)                         # [1, 1]
            q_s = q * jnp.exp(G)
            k_s = k * jnp.exp(last - G)
            S_dec = jnp.exp(last) * S
        else:
            A = jnp.where(causal, mm(q, k, cd, tb=True), 0)
            q_s, k_s, S_dec = q, k, S
        o = mm(q_s, S, cd) + mm(A, v, cd)
        S_next = S_dec + mm(k_s, v, cd, ta=True)
        return o, S_next

    return fn


def gdn_chunk_fn(*, has_g: bool, scale: float, cd, diff: bool = False):
    """One chunk of the gated delta rule: (S, q, k, v, beta, [G]) -> (o, S_next).

    The WY/UT form: T = (I + strict_lower(diag(β) (Γ ⊙ K Kᵀ)))^-1, W = T (β Γ_0 K),
    U = T (β V), pseudo-values U - W S, then read-out and state update as in linear attention.
    """

    mm = _mm_diff if diff else _mm_plain

    def fn(S, q, k, v, beta, *extras):
        G = extras[0] if has_g else None
        C = q.shape[0]
        i, j = _iota((C, C), 0), _iota((C, C), 1)
        causal, strict = i >= j, i > j
        q = q * scale
        kk = mm(k, k, cd, tb=True)
        qk = mm(q, k, cd, tb=True)
        if G is not None:
            gam = _masked_exp(G - _row(G), causal)
            last = _last_row(G)
            eg = jnp.exp(G)
            k_s = k * jnp.exp(last - G)
            S_dec = jnp.exp(last) * S
        else:
            gam = causal.astype(S.dtype)
            eg = 1.0
            k_s, S_dec = k, S
        L = jnp.where(strict, beta * kk * gam, 0)
        T = ut_inverse(L) if diff else _ut_inverse(L, SUB)
        W = mm(T, k * (beta * eg), cd)
        U = mm(T, v * beta, cd)
        vn = U - mm(W, S, cd)
        o = mm(q * eg, S, cd) + mm(qk * gam, vn, cd)
        S_next = S_dec + mm(k_s, vn, cd, ta=True)
        return o, S_next

    return fn


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Static description of one kernel call (hashable: a nondiff argument of custom_vjp)."""
    family: str            # "la" | "gdn"
    has_g: bool
    has_gk: bool
    scale: float
    cd: str                # matmul operand dtype
    acc: str               # accumulation / state dtype
    out: str               # o's dtype
    kinds: tuple           # per extra input: "col" [BH, T, 1], "key" [BH, T, Kp] or
                           # "kcol" [BH, NC, Kp, 1] (one column per chunk)
    H: int
    C: int
    NC: int
    Kp: int
    Vp: int
    BV: int
    backend: str           # "tpu" | "gpu"
    interpret: bool
    varlen: bool           # packed sequences (cu_seqlens): final states come from many chunks

    @property
    def NV(self) -> int:
        return self.Vp // self.BV

    def extra_shape(self, kind: str, BH: int, T_pad: int) -> tuple:
        return {"col": (BH, T_pad, 1), "key": (BH, T_pad, self.Kp),
                "kcol": (BH, self.NC, self.Kp, 1)}[kind]

    def chunk_fn(self, diff: bool = False):
        """The chunk function; `diff=True` for the one the backward kernels differentiate."""
        cd = jnp.dtype(self.cd)
        if self.family == "la":
            return la_chunk_fn(has_g=self.has_g, has_gk=self.has_gk, scale=self.scale, cd=cd,
                               diff=diff)
        return gdn_chunk_fn(has_g=self.has_g, scale=self.scale, cd=cd, diff=diff)


# ----------------------------------------------------------------------------- TPU kernels
def _tpu_specs(cfg: ScanConfig, reverse: bool):
    """Index maps of the TPU grid (BH, V tiles, chunks); `reverse` walks chunks backwards."""
    H, NC, C, Kp, BV = cfg.H, cfg.NC, cfg.C, cfg.Kp, cfg.BV

    def ch(c):
        return NC - 1 - c if reverse else c

    key = pl.BlockSpec((None, C, Kp), lambda bh, iv, c, r, s: (bh, ch(c), 0))
    col = pl.BlockSpec((None, C, 1), lambda bh, iv, c, r, s: (bh, ch(c), 0))
    val = pl.BlockSpec((None, C, BV), lambda bh, iv, c, r, s: (bh, ch(c), iv))
    def h0_row(bh, c, s):  # initial-state row of the chunk's sequence, for head bh % H
        return s[_div(bh, H) * NC + ch(c)] * H + _rem(bh, H)

    h0 = pl.BlockSpec((None, Kp, BV), lambda bh, iv, c, r, s: (h0_row(bh, c, s), 0, iv))
    state = pl.BlockSpec((None, None, Kp, BV), lambda bh, iv, c, r, s: (bh, ch(c), 0, iv))
    # One resident block per (bh, tile), written back once: the state after the last chunk.
    last_state = pl.BlockSpec((None, None, Kp, BV), lambda bh, iv, c, r, s: (bh, 0, 0, iv))
    prev_state = pl.BlockSpec(
        (None, None, Kp, BV), lambda bh, iv, c, r, s: (bh, jnp.maximum(ch(c) - 1, 0), 0, iv))
    part = {"key": pl.BlockSpec((None, None, C, Kp), lambda bh, iv, c, r, s: (iv, bh, ch(c), 0)),
            "col": pl.BlockSpec((None, None, C, 1), lambda bh, iv, c, r, s: (iv, bh, ch(c), 0)),
            "kcol": pl.BlockSpec((None, None, None, Kp, 1),
                                 lambda bh, iv, c, r, s: (iv, bh, ch(c), 0, 0))}
    kcol = pl.BlockSpec((None, None, Kp, 1), lambda bh, iv, c, r, s: (bh, ch(c), 0, 0))
    return dict(key=key, col=col, kcol=kcol, val=val, h0=h0, state=state,
                last_state=last_state, prev_state=prev_state, part=part)


def _tpu_params(cfg):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu, pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))


def tpu_forward(cfg: ScanConfig, q, k, v, extras, h0, reset, hidx, all_states=True):
    pltpu, params = _tpu_params(cfg)
    sp = _tpu_specs(cfg, reverse=False)
    BH, T_pad, _ = q.shape
    H, NC, n = cfg.H, cfg.NC, len(extras)
    acc = jnp.dtype(cfg.acc)
    fn = cfg.chunk_fn()

    def kernel(r_ref, s_ref, q_ref, k_ref, v_ref, *rest):
        ex_refs, (h0_ref, o_ref, st_ref, S_scr) = rest[:n], rest[n:]
        bh, c = pl.program_id(0), pl.program_id(2)

        @pl.when((c == 0) | (r_ref[_div(bh, H) * NC + c] != 0))
        def _():
            S_scr[...] = h0_ref[...].astype(acc)

        o, S = fn(S_scr[...], q_ref[...].astype(acc), k_ref[...].astype(acc),
                  v_ref[...].astype(acc), *[e[...].astype(acc) for e in ex_refs])
        o_ref[...] = o.astype(o_ref.dtype)
        S_scr[...] = S
        st_ref[...] = S.astype(st_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(BH, cfg.NV, NC),
        in_specs=[sp["key"], sp["key"], sp["val"]] + [sp[kd] for kd in cfg.kinds] + [sp["h0"]],
        out_specs=[sp["val"], sp["state"] if all_states else sp["last_state"]],
        scratch_shapes=[pltpu.VMEM((cfg.Kp, cfg.BV), acc)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, compiler_params=params, interpret=cfg.interpret,
        out_shape=[jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), jnp.dtype(cfg.out)),
                   jax.ShapeDtypeStruct((BH, NC if all_states else 1, cfg.Kp, cfg.Vp), acc)],
        name=f"{cfg.family}_chunk_fwd_tpu",
    )(reset, hidx, q, k, v, *extras, h0)


def tpu_backward(cfg: ScanConfig, q, k, v, extras, h0, reset, hidx, states, do, dstates):
    pltpu, params = _tpu_params(cfg)
    sp = _tpu_specs(cfg, reverse=True)
    BH, T_pad, _ = q.shape
    H, NC, NV, n = cfg.H, cfg.NC, cfg.NV, len(extras)
    acc = jnp.dtype(cfg.acc)
    fn = cfg.chunk_fn(diff=True)

    def kernel(r_ref, s_ref, q_ref, k_ref, v_ref, *rest):
        ex_refs = rest[:n]
        h0_ref, sa_ref, do_ref, dst_ref, dq_ref, dk_ref, dv_ref = rest[n:n + 7]
        dex_refs = rest[n + 7:2 * n + 7]
        dh0_ref, dS_scr = rest[2 * n + 7:]
        bh, c = pl.program_id(0), pl.program_id(2)
        cc = NC - 1 - c
        flag = (cc == 0) | (r_ref[_div(bh, H) * NC + cc] != 0)

        @pl.when(c == 0)
        def _():
            dS_scr[...] = jnp.zeros(dS_scr.shape, acc)

        S_in = jnp.where(flag, h0_ref[...].astype(acc), sa_ref[...].astype(acc))
        dS_out = dS_scr[...] + dst_ref[...].astype(acc)
        _, vjp = jax.vjp(fn, S_in, q_ref[...].astype(acc), k_ref[...].astype(acc),
                         v_ref[...].astype(acc), *[e[...].astype(acc) for e in ex_refs])
        dS, dq, dk, dv, *dex = vjp((do_ref[...].astype(acc), dS_out))
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv.astype(dv_ref.dtype)
        for r, d in zip(dex_refs, dex):
            r[...] = d
        dS_scr[...] = jnp.where(flag, jnp.zeros_like(dS), dS)

        @pl.when(flag)
        def _():
            dh0_ref[...] = dS

    f32 = acc
    out_shape = ([jax.ShapeDtypeStruct((NV, BH, T_pad, cfg.Kp), f32)] * 2
                 + [jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), f32)]
                 + [jax.ShapeDtypeStruct((NV,) + cfg.extra_shape(kd, BH, T_pad), f32)
                    for kd in cfg.kinds]
                 + [jax.ShapeDtypeStruct(h0.shape, f32)])
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(BH, NV, NC),
        in_specs=([sp["key"], sp["key"], sp["val"]] + [sp[kd] for kd in cfg.kinds]
                  + [sp["h0"], sp["prev_state"], sp["val"], sp["state"]]),
        out_specs=([sp["part"]["key"]] * 2 + [sp["val"]]
                   + [sp["part"][kd] for kd in cfg.kinds] + [sp["h0"]]),
        scratch_shapes=[pltpu.VMEM((cfg.Kp, cfg.BV), acc)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, compiler_params=params, interpret=cfg.interpret,
        out_shape=out_shape, name=f"{cfg.family}_chunk_bwd_tpu",
    )(reset, hidx, q, k, v, *extras, h0, states, do, dstates)


# ----------------------------------------------------------------------------- GPU kernels
def _gpu_params(cfg):
    from jax.experimental.pallas import triton as pltr
    return pltr.CompilerParams(num_warps=4, num_stages=2)


def _gpu_specs(cfg: ScanConfig, T_pad: int, n_rows: int, n_idx: int):
    NC, Kp, BV = cfg.NC, cfg.Kp, cfg.BV
    key = pl.BlockSpec((None, T_pad, Kp), lambda bh, iv: (bh, 0, 0))
    col = pl.BlockSpec((None, T_pad, 1), lambda bh, iv: (bh, 0, 0))
    val = pl.BlockSpec((None, T_pad, BV), lambda bh, iv: (bh, 0, iv))
    h0 = pl.BlockSpec((n_rows, Kp, BV), lambda bh, iv: (0, 0, iv))
    idx = pl.BlockSpec((n_idx,), lambda bh, iv: (0,))
    state = pl.BlockSpec((None, NC, Kp, BV), lambda bh, iv: (bh, 0, 0, iv))
    last_state = pl.BlockSpec((None, 1, Kp, BV), lambda bh, iv: (bh, 0, 0, iv))
    part = {"key": pl.BlockSpec((None, None, T_pad, Kp), lambda bh, iv: (iv, bh, 0, 0)),
            "col": pl.BlockSpec((None, None, T_pad, 1), lambda bh, iv: (iv, bh, 0, 0)),
            "kcol": pl.BlockSpec((None, None, NC, Kp, 1), lambda bh, iv: (iv, bh, 0, 0, 0))}
    kcol = pl.BlockSpec((None, NC, Kp, 1), lambda bh, iv: (bh, 0, 0, 0))
    return dict(key=key, col=col, kcol=kcol, val=val, h0=h0, idx=idx, state=state,
                last_state=last_state, part=part)


def _gpu_extra_loader(cfg, ex_refs, acc):
    def load(c, t):  # chunk c's rows t of token inputs, its column of per-chunk inputs
        return [(e[c] if kd == "kcol" else e[t, :]).astype(acc)
                for e, kd in zip(ex_refs, cfg.kinds)]
    return load


def gpu_forward(cfg: ScanConfig, q, k, v, extras, h0, reset, hidx, all_states=True):
    BH, T_pad, _ = q.shape
    H, NC, C, n = cfg.H, cfg.NC, cfg.C, len(extras)
    acc = jnp.dtype(cfg.acc)
    sp = _gpu_specs(cfg, T_pad, h0.shape[0], reset.shape[0])
    fn = cfg.chunk_fn()

    def kernel(r_ref, s_ref, q_ref, k_ref, v_ref, *rest):
        ex_refs, (h0_ref, o_ref, st_ref) = rest[:n], rest[n:]
        bh = pl.program_id(0)
        load_extras = _gpu_extra_loader(cfg, ex_refs, acc)
        b, h = _div(bh, H), _rem(bh, H)

        def body(c, S):
            i = b * NC + c
            flag = (c == 0) | (r_ref[i] != 0)
            S = jnp.where(flag, h0_ref[s_ref[i] * H + h].astype(acc), S)
            t = pl.ds(pl.multiple_of(c * C, C), C)
            o, S = fn(S, q_ref[t, :].astype(acc), k_ref[t, :].astype(acc),
                      v_ref[t, :].astype(acc), *load_extras(c, t))
            o_ref[t, :] = o.astype(o_ref.dtype)
            if all_states:
                st_ref[c] = S.astype(st_ref.dtype)
            return S

        S = lax.fori_loop(0, NC, body, jnp.zeros((cfg.Kp, cfg.BV), acc))
        if not all_states:
            st_ref[0] = S.astype(st_ref.dtype)

    return pl.pallas_call(
        kernel, grid=(BH, cfg.NV), compiler_params=_gpu_params(cfg), interpret=cfg.interpret,
        in_specs=([sp["idx"], sp["idx"], sp["key"], sp["key"], sp["val"]]
                  + [sp[kd] for kd in cfg.kinds] + [sp["h0"]]),
        out_specs=[sp["val"], sp["state"] if all_states else sp["last_state"]],
        out_shape=[jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), jnp.dtype(cfg.out)),
                   jax.ShapeDtypeStruct((BH, NC if all_states else 1, cfg.Kp, cfg.Vp), acc)],
        name=f"{cfg.family}_chunk_fwd_gpu",
    )(reset, hidx, q, k, v, *extras, h0)


def gpu_backward(cfg: ScanConfig, q, k, v, extras, h0, reset, hidx, states, do, dstates):
    BH, T_pad, _ = q.shape
    H, NC, C, NV, n = cfg.H, cfg.NC, cfg.C, cfg.NV, len(extras)
    acc = jnp.dtype(cfg.acc)
    sp = _gpu_specs(cfg, T_pad, h0.shape[0], reset.shape[0])
    fn = cfg.chunk_fn(diff=True)

    def kernel(r_ref, s_ref, q_ref, k_ref, v_ref, *rest):
        ex_refs = rest[:n]
        h0_ref, sa_ref, do_ref, dst_ref, dq_ref, dk_ref, dv_ref = rest[n:n + 7]
        dex_refs = rest[n + 7:2 * n + 7]
        (dh0_ref,) = rest[2 * n + 7:]
        bh = pl.program_id(0)
        load_extras = _gpu_extra_loader(cfg, ex_refs, acc)
        b, h = _div(bh, H), _rem(bh, H)

        def body(j, dS_next):
            c = NC - 1 - j
            i = b * NC + c
            flag = (c == 0) | (r_ref[i] != 0)
            row = s_ref[i] * H + h
            S_in = jnp.where(flag, h0_ref[row].astype(acc),
                             sa_ref[jnp.maximum(c - 1, 0)].astype(acc))
            dS_out = dS_next + dst_ref[c].astype(acc)
            t = pl.ds(pl.multiple_of(c * C, C), C)
            _, vjp = jax.vjp(fn, S_in, q_ref[t, :].astype(acc), k_ref[t, :].astype(acc),
                             v_ref[t, :].astype(acc), *load_extras(c, t))
            dS, dq, dk, dv, *dex = vjp((do_ref[t, :].astype(acc), dS_out))
            dq_ref[t, :] = dq
            dk_ref[t, :] = dk
            dv_ref[t, :] = dv.astype(dv_ref.dtype)
            for r, d, kd in zip(dex_refs, dex, cfg.kinds):
                if kd == "kcol":
                    r[c] = d
                else:
                    r[t, :] = d

            @pl.when(flag)
            def _():
                dh0_ref[row] = dS

            return jnp.where(flag, jnp.zeros_like(dS), dS)

        lax.fori_loop(0, NC, body, jnp.zeros((cfg.Kp, cfg.BV), acc))

    out_shape = ([jax.ShapeDtypeStruct((NV, BH, T_pad, cfg.Kp), acc)] * 2
                 + [jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), acc)]
                 + [jax.ShapeDtypeStruct((NV,) + cfg.extra_shape(kd, BH, T_pad), acc)
                    for kd in cfg.kinds]
                 + [jax.ShapeDtypeStruct(h0.shape, acc)])
    return pl.pallas_call(
        kernel, grid=(BH, NV), compiler_params=_gpu_params(cfg), interpret=cfg.interpret,
        in_specs=([sp["idx"], sp["idx"], sp["key"], sp["key"], sp["val"]]
                  + [sp[kd] for kd in cfg.kinds] + [sp["h0"], sp["state"], sp["val"],
                                                    sp["state"]]),
        out_specs=([sp["part"]["key"]] * 2 + [sp["val"]]
                   + [sp["part"][kd] for kd in cfg.kinds] + [sp["h0"]]),
        out_shape=out_shape, name=f"{cfg.family}_chunk_bwd_gpu",
    )(reset, hidx, q, k, v, *extras, h0, states, do, dstates)


# ----------------------------------------------------------------------------- custom_vjp
def _forward(cfg, *args, all_states=True):
    return (tpu_forward if cfg.backend == "tpu" else gpu_forward)(cfg, *args,
                                                                  all_states=all_states)


def _backward(cfg, *args):
    return (tpu_backward if cfg.backend == "tpu" else gpu_backward)(cfg, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, q, k, v, extras, h0, reset, hidx):
    # Not differentiated: without packed sequences only the last state is needed, so the
    # kernel keeps one state block per (bh, tile) instead of one per chunk.
    return tuple(_forward(cfg, q, k, v, extras, h0, reset, hidx, all_states=cfg.varlen))


def _scan_fwd(cfg, q, k, v, extras, h0, reset, hidx):
    o, states = _forward(cfg, q, k, v, extras, h0, reset, hidx)
    return (o, states), (q, k, v, extras, h0, reset, hidx, states)


def _scan_bwd(cfg, res, cts):
    q, k, v, extras, h0, reset, hidx, states = res
    do, dstates = cts
    n = len(extras)
    outs = _backward(cfg, q, k, v, extras, h0, reset, hidx, states, do, dstates)
    dq, dk, dv = outs[0].sum(0), outs[1].sum(0), outs[2]
    dex = tuple(d.sum(0).astype(e.dtype) for d, e in zip(outs[3:3 + n], extras))
    dh0 = outs[3 + n]
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dex,
            dh0.astype(h0.dtype), None, None)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- the op wrapper
@dataclasses.dataclass(frozen=True)
class Blocks:
    """The backend's block-shape policy: K and V are padded to multiples of `align` (and to a
    power of two if `pow2`), V is split into tiles of `v_tile`."""
    backend: str
    align: int
    v_tile: int
    pow2: bool


# TPU (Mosaic): grid (batch·heads, V tiles of 128, chunks); the chunk axis is sequential
# ("arbitrary") and the float32 state lives in a VMEM scratch across it; per-chunk reset flags
# and initial-state rows are scalar-prefetched into SMEM and steer the index maps; K and V are
# padded to multiples of 128 lanes.
TPU_BLOCKS = Blocks("tpu", align=128, v_tile=128, pow2=False)
# GPU (Pallas' Triton backend): grid (batch·heads, V tiles of 64) with the chunk loop inside the
# kernel (a fori_loop carrying the float32 state); K and V are padded to powers of two >= 16
# (Triton's tensor shapes); num_warps=4, num_stages=2.
GPU_BLOCKS = Blocks("gpu", align=16, v_tile=64, pow2=True)
BLOCKS = {"tpu": TPU_BLOCKS, "gpu": GPU_BLOCKS}


def blocks_for(backend: Optional[str]) -> Blocks:
    """The block policy of `backend` ("tpu" | "gpu"; None: the default device's layout)."""
    backend = backend or default_backend()
    if backend not in BLOCKS:
        raise ValueError(f"`backend` must be 'tpu' or 'gpu', got {backend!r}")
    return BLOCKS[backend]


def _pad_dim(d: int, blocks: Blocks) -> int:
    if blocks.pow2:
        p = blocks.align
        while p < d:
            p *= 2
        return p
    return -(-d // blocks.align) * blocks.align


def chunked_scan(family: str, q, k, v, *, beta=None, g=None, gk=None, scale: float,
                 initial_state=None, cu_seqlens=None, chunk_size: int = 64,
                 blocks: Blocks, interpret: Optional[bool] = None):
    """Run one op family's Pallas kernels on validated [B, T, H, D] inputs.

    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in the accumulation dtype).
    """
    if interpret is None:
        interpret = default_interpret()
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = common.acc_dtype(q)
    cd = jnp.result_type(q, k, v)
    cd = cd if jnp.dtype(cd).itemsize < 4 else acc
    # Per-key gates form a [C, C, K] block inside the kernel: keep their chunk small.
    C = SUB if gk is not None else max(chunk_size, SUB)
    layout = common.chunk_layout(B, T, C, cu_seqlens)
    NC, T_pad, N = layout.num_chunks, layout.T_pad, layout.num_seqs
    Kp, Vp = _pad_dim(K, blocks), _pad_dim(V, blocks)
    BV = min(blocks.v_tile, Vp)

    def tokens(x, width, dtype=None, cumsum=False):
        """[B, T, H(, D)] -> [B·H, T_pad, width]; gates become within-chunk cumulative sums."""
        if dtype is not None:
            x = x.astype(dtype)
        if x.ndim == 3:
            x = x[..., None]
        x = layout.to_chunks(x)                            # [B, NC, C, H, D]
        if cumsum:
            x = jnp.cumsum(x, axis=2)
        x = x.reshape(B, T_pad, H, x.shape[-1]).transpose(0, 2, 1, 3)
        x = x.reshape(B * H, T_pad, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[-1])))

    extras, kinds = [], []
    if beta is not None:
        extras.append(tokens(beta, 1, acc)); kinds.append("col")
    if g is not None:
        extras.append(tokens(g, 1, acc, cumsum=True)); kinds.append("col")
    if gk is not None:
        gk_cum = tokens(gk, Kp, acc, cumsum=True)
        extras.append(gk_cum); kinds.append("key")
        last = gk_cum.reshape(B * H, NC, C, Kp)[:, :, C - 1, :, None]   # [BH, NC, Kp, 1]
        extras.append(last); kinds.append("kcol")

    if initial_state is None:
        h0 = jnp.zeros((N * H, Kp, Vp), acc)
    else:
        h0 = initial_state.astype(acc)
        if layout.empty is not None:  # an empty sequence's state bypasses the kernel
            h0 = jnp.where(layout.empty[:, None, None, None], lax.stop_gradient(h0), h0)
        h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))).reshape(N * H, Kp, Vp)
    reset = layout.reset.reshape(-1).astype(jnp.int32)
    hidx = layout.seq.reshape(-1).astype(jnp.int32)

    cfg = ScanConfig(
        family=family, has_g=g is not None, has_gk=gk is not None, scale=float(scale),
        cd=jnp.dtype(cd).name, acc=jnp.dtype(acc).name, out=jnp.dtype(q.dtype).name,
        kinds=tuple(kinds), H=H, C=C, NC=NC, Kp=Kp, Vp=Vp, BV=BV, backend=blocks.backend,
        interpret=bool(interpret), varlen=cu_seqlens is not None)
    o, states = _scan(cfg, tokens(q, Kp), tokens(k, Kp), tokens(v, Vp), tuple(extras), h0,
                      reset, hidx)

    o = o[..., :V].reshape(B, H, T_pad, V).transpose(0, 2, 1, 3)
    o = layout.from_chunks(o.reshape(B, NC, C, H, V))
    states = states[..., :K, :V].reshape(B, H, -1, K, V).transpose(0, 2, 1, 3, 4)
    h0_user = None if initial_state is None else initial_state.astype(acc)
    return o.astype(q.dtype), layout.final_states(states, h0_user)
