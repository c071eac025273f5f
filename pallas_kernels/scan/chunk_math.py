"""The math of one chunk of the chunked scans, written once and used by every Pallas kernel
(both backends, every phase). Pure functions of arrays: no refs, no grids.

For one chunk of C tokens (one batch·head, one value tile), with q already scaled, gates given
as within-chunk cumulative log decays A (G [C, 1] per head, Gk [C, K] per key, or none):

    Qe = q ⊙ e^A  (`query_gate`);   Ks = k ⊙ e^(A_C − A),  d = e^(A_C)  (`key_decay`)
    P  = lower(Σ_k q_ik k_jk e^(A_ik − A_jk))  (diagonal kept)   (`intra_scores`)
    gated delta rule only (`ut_transform`):
        T = (I + strict_lower(diag(β) Γ(K, K)))⁻¹,  W = T (β e^A ⊙ K),  U = T (β ⊙ V)
        with Γ(K, K)_ij = Σ_k k_ik k_jk e^(A_ik − A_jk) (per-key A: KDA)
        (T is kept from the forward for the backward, which needs only its closed-form vjp)
    vn = U − W S_in  (delta rule)   or   vn = V  (linear attention)
    o     = Qe S_in + P vn
    S_out = d ⊙ S_in + Ksᵀ vn

The kernels split this into phases (see `phases`): W, U for all chunks at once; one
sequential pass that only carries S (`state_step`, and `state_step_bwd` backwards); outputs
(`chunk_output`) and gradients (`jax.vjp` of `chunk_fn`) for all chunks at once.

Every exponent taken is of a non-positive number (differences A_i − A_j are masked to i ≥ j
before `exp`). Matmul operands are cast to the compute dtype `cd` (bf16 for bf16 inputs) and
accumulate in float32 (float64 for float64 inputs); elementwise work is in the accumulation
dtype.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ..common import div, rem

SUB = 16  # block of the UT forward substitution, and the chunk used with per-key gates


# ----------------------------------------------------------------------------- small ops
def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(a, b, cd, ta, tb, precise=True):
    acc = jnp.promote_types(cd, jnp.float32)
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    prec = lax.Precision.HIGHEST if precise and cd != jnp.bfloat16 else None
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


def matmul(diff: bool):
    """a @ b (either transposed on request) with operands in `cd`, accumulated in float32 or
    float64 (f32 operands at full precision, so a TPU does not round them to bf16).
    `diff=True`: the variant for code that `jax.vjp` differentiates inside a kernel (its vjp
    keeps both operands of every dot in `cd`); Triton cannot lower that one undifferentiated."""
    if diff:
        return lambda a, b, cd, ta=False, tb=False: _mm_vjp(a, b, jnp.dtype(cd), ta, tb)
    return lambda a, b, cd, ta=False, tb=False: _dot(a, b, jnp.dtype(cd), ta, tb)


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


# ----------------------------------------------------------------------------- UT inverse
def ut_inverse(L, block: int = SUB, precise: bool = True):
    """(I + L)^-1 for a strictly lower-triangular L [C, C], by blocked forward substitution.

    The diagonal blocks (size `block`) are inverted together, one row of every block per loop
    step (I + L_d is block diagonal); the off-diagonal blocks are then merged with matmuls:
    (I + L)^-1 = (I + D L_o)^-1 D with D = (I + L_d)^-1, and N = -D L_o is block-nilpotent,
    so (I + D L_o)^-1 = prod_p (I + N^(2^p)). With `precise=False` the float32 matmuls run at
    the backend's default precision (TF32 tensor cores on a GPU): enough for bf16 inputs, and
    several times faster than full float32 there. Not differentiable: the backward reuses the
    forward's inverse (`reuse_inverse`).
    """
    C = L.shape[0]
    b = min(block, C)
    dt = L.dtype

    def mm(x, y, dt):
        return _dot(x, y, dt, False, False, precise)

    r, c = _iota((C, C), 0), _iota((C, C), 1)
    eye = (r == c).astype(dt)
    same = div(r, b) == div(c, b)
    Ld = jnp.where(same, L, 0)

    def step(i, T):  # row i of every diagonal block; rows above it are final already
        return jnp.where(rem(r, b) == i, eye - mm(Ld, T, dt), T)

    T = lax.fori_loop(1, b, step, eye)  # row 0 of every block is e_r
    if C > b:
        N = -mm(T, jnp.where(same, 0, L), dt)
        P, Np = eye + N, N
        nb = C // b
        p = 2
        while p < nb:
            Np = mm(Np, Np, dt)
            P = mm(P, eye + Np, dt)
            p *= 2
        T = mm(P, T, dt)
    return T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def reuse_inverse(L, T, precise: bool = True):
    """T, given T = (I + L)^-1 computed already (by the forward kernel), as a function of L:
    its gradient is the closed form dL = strict_lower(-Tᵀ dT Tᵀ), two matmuls, so the
    backward neither recomputes nor differentiates the substitution loop."""
    return T


def _reuse_inverse_fwd(L, T, precise):
    return T, T


def _reuse_inverse_bwd(precise, T, dT):
    C = T.shape[0]
    dt = T.dtype
    dL = -_dot(_dot(T, dT, dt, True, False, precise), T, dt, False, True, precise)
    return jnp.where(_iota((C, C), 0) > _iota((C, C), 1), dL, 0), jnp.zeros_like(T)


reuse_inverse.defvjp(_reuse_inverse_fwd, _reuse_inverse_bwd)


# ----------------------------------------------------------------------------- the chunk
class Gates(NamedTuple):
    """A chunk's gate inputs (None where the op has none), in the accumulation dtype.
    G [C, 1] and Gk [C, K]: within-chunk cumulative log decays; Gk_last [K, 1]: Gk's last row
    as a column (given, so that no kernel transposes a row: a [K, K] select would crowd a
    GPU's registers); beta [C, 1]."""
    beta: Optional[jax.Array] = None
    G: Optional[jax.Array] = None
    Gk: Optional[jax.Array] = None
    Gk_last: Optional[jax.Array] = None


class Spec(NamedTuple):
    """Static description of the op (hashable)."""
    delta: bool            # gated delta rule (else linear attention)
    has_g: bool
    has_gk: bool
    scale: float
    cd: str                # matmul operand dtype

    @property
    def kinds(self) -> tuple:
        """Per extra kernel input: "col" [.., T, 1], "key" [.., T, K], "kcol" [.., NC, K, 1]."""
        return (("col",) * (self.delta + self.has_g)
                + (("key", "kcol") if self.has_gk else ()))

    def gates(self, extras) -> Gates:
        """The extra kernel inputs (in `kinds` order) as Gates."""
        ex = list(extras)
        beta = ex.pop(0) if self.delta else None
        G = ex.pop(0) if self.has_g else None
        Gk, Gk_last = (ex.pop(0), ex.pop(0)) if self.has_gk else (None, None)
        return Gates(beta, G, Gk, Gk_last)


def _decays(gt: Gates):
    """(A, A_C): the cumulative log decays [C, 1] or [C, K] (None without gates) and their
    value at the chunk's end, [1, 1] or as a [K, 1] column."""
    if gt.Gk is not None:
        A, A_last = gt.Gk, gt.Gk_last
        if gt.G is not None:
            A, A_last = A + gt.G, A_last + _last_row(gt.G)
        return A, A_last
    if gt.G is not None:
        return gt.G, _last_row(gt.G)
    return None, None


def query_gate(gt: Gates, q):
    """Qe = q ⊙ e^A: how the state entering the chunk has decayed by each query."""
    A, _ = _decays(gt)
    return q if A is None else q * jnp.exp(A)


def key_decay(gt: Gates, k):
    """(Ks, d) = (k ⊙ e^(A_C − A), e^(A_C)): what each key and the entering state keep of
    themselves at the chunk's end."""
    A, A_last = _decays(gt)
    if A is None:
        return k, jnp.ones((1, 1), k.dtype)
    return k * jnp.exp(_last_row(A) - A), jnp.exp(A_last)


def intra_scores(gt: Gates, q, k, cd, mm):
    """P [C, C]: Σ_k q_ik k_jk e^(A_ik − A_jk) for i ≥ j, 0 above (q already scaled)."""
    C = q.shape[0]
    causal = _iota((C, C), 0) >= _iota((C, C), 1)
    if gt.Gk is not None:
        # Per-key decays: elementwise over [C, C, K] (the per-key chunk is small, SUB),
        # exponents masked to i >= j first.
        A, _ = _decays(gt)
        E = _masked_exp(A[:, None, :] - A[None, :, :], causal[:, :, None])
        return jnp.sum(q[:, None, :] * k[None, :, :] * E, axis=-1)
    qk = mm(q, k, cd, tb=True)
    if gt.G is not None:
        return qk * _masked_exp(gt.G - _row(gt.G), causal)
    return jnp.where(causal, qk, 0)


def ut_transform(gt: Gates, k, v, cd, T=None):
    """(W [C, K], U [C, V], T [C, C]) of the gated delta rule's WY/UT form. Given T (the
    forward's inverse), the form to differentiate: T enters through `reuse_inverse`."""
    diff = T is not None
    mm = matmul(diff)
    C = k.shape[0]
    i, j = _iota((C, C), 0), _iota((C, C), 1)
    if gt.Gk is not None:
        # Per-key decays (KDA): Σ_k k_ik k_jk e^(A_ik − A_jk), the masked elementwise form of
        # `intra_scores` (the per-key chunk is small, SUB).
        kk, gam = intra_scores(gt, k, k, cd, mm), 1.0
        kb = k * (gt.beta * jnp.exp(_decays(gt)[0]))
    else:
        kk = mm(k, k, cd, tb=True)
        if gt.G is not None:
            gam = _masked_exp(gt.G - _row(gt.G), i >= j)
            kb = k * (gt.beta * jnp.exp(gt.G))
        else:
            gam, kb = 1.0, k * gt.beta
    L = jnp.where(i > j, gt.beta * kk * gam, 0)
    precise = jnp.dtype(cd) != jnp.bfloat16
    T = reuse_inverse(L, T, precise) if diff else ut_inverse(L, SUB, precise)
    return mm(T, kb, cd), mm(T, v * gt.beta, cd), T


def state_step(spec: Spec, S, k, u, w, extras):
    """One step of the sequential pass: S [K, BV] entering the chunk -> (vn, S leaving it).
    u: U (delta rule) or V (linear attention) [C, BV]; w: W [C, K] or None."""
    mm = matmul(False)
    Ks, d = key_decay(spec.gates(extras), k)
    vn = u - mm(w, S, spec.cd) if spec.delta else u
    return vn, d * S + mm(Ks, vn, spec.cd, ta=True)


def state_step_bwd(spec: Spec, dS, q, k, w, do, dvo, extras):
    """One reverse step: the cotangent of the state leaving the chunk -> of the one entering.
    dvo [C, BV] = Pᵀ do (`intra_dv`), needed by the delta rule only."""
    mm = matmul(False)
    gt = spec.gates(extras)
    Ks, d = key_decay(gt, k)
    dS_in = d * dS + mm(query_gate(gt, q * spec.scale), do, spec.cd, ta=True)
    if spec.delta:
        dvn = dvo + mm(Ks, dS, spec.cd)
        dS_in = dS_in - mm(w, dvn, spec.cd, ta=True)
    return dS_in


def chunk_output(spec: Spec, S, q, k, vn, extras):
    """o [C, BV] = Qe S_in + P vn."""
    mm = matmul(False)
    gt = spec.gates(extras)
    q = q * spec.scale
    return mm(query_gate(gt, q), S, spec.cd) + mm(intra_scores(gt, q, k, spec.cd, mm), vn, spec.cd)


def intra_dv(spec: Spec, q, k, do, extras):
    """Pᵀ do [C, BV]: the read-out's share of the cotangent of vn."""
    mm = matmul(False)
    P = intra_scores(spec.gates(extras), q * spec.scale, k, spec.cd, mm)
    return mm(P, do, spec.cd, ta=True)


def chunk_fn(spec: Spec):
    """The whole chunk, (S_in, T, q, k, v, *extras) -> (o, S_out), for `jax.vjp` in a kernel
    (T: the forward's UT inverse of the chunk; None for linear attention)."""
    mm = matmul(True)
    cd = spec.cd

    def fn(S, T, q, k, v, *extras):
        gt = spec.gates(extras)
        q = q * spec.scale
        Ks, d = key_decay(gt, k)
        if spec.delta:
            W, U, _ = ut_transform(gt, k, v, cd, T)
            vn = U - mm(W, S, cd)
        else:
            vn = v
        o = mm(query_gate(gt, q), S, cd) + mm(intra_scores(gt, q, k, cd, mm), vn, cd)
        return o, d * S + mm(Ks, vn, cd, ta=True)

    return fn
