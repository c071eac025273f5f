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
(`chunk_output`) and gradients (`chunk_grads`: the backward written out, matmuls and
elementwise work only, from the forward's T and chunk states) for all chunks at once.

Every exponent taken is of a non-positive number (differences A_i − A_j are masked to i ≥ j
before `exp`). Matmul operands are cast to the compute dtype `cd` (bf16 for bf16 inputs) and
accumulate in float32 (float64 for float64 inputs); elementwise work is in the accumulation
dtype. float32 operands are multiplied at full precision unless `Spec.precise` is False (then
at the backend's default: TF32 tensor cores on a GPU, as fla; see `phases.Blocks.tf32`).
"""
from __future__ import annotations

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


def matmul(precise: bool = True):
    """a @ b (either transposed on request) with operands in `cd`, accumulated in float32 or
    float64; float32 operands at full precision (so that neither a TPU rounds them to bf16 nor
    a GPU to TF32) unless `precise=False`."""
    return lambda a, b, cd, ta=False, tb=False: _dot(a, b, jnp.dtype(cd), ta, tb, precise)


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
    several times faster than full float32 there. Not differentiated: the backward reuses the
    forward's inverse (`inverse_bwd`).
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


def inverse_bwd(T, dT, precise: bool = True):
    """The cotangent of L, given that of T = (I + L)^-1 (L strictly lower): the closed form
    dL = strict_lower(-Tᵀ dT Tᵀ), two matmuls; the backward never redoes the substitution."""
    C = T.shape[0]
    dt = T.dtype
    dL = -_dot(_dot(T, dT, dt, True, False, precise), T, dt, False, True, precise)
    return jnp.where(_iota((C, C), 0) > _iota((C, C), 1), dL, 0)


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
    precise: bool = True   # float32 operands at full precision (else TF32 on a GPU)

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
    return k * _to_end(A), jnp.exp(A_last)


def _to_end(A):
    """e^(A_C − A) [C, K] or [C, 1]: the decay from each token to the chunk's end."""
    return jnp.exp(_last_row(A) - A)


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


def _gammas(gt: Gates, k, cd, mm):
    """Γ(K, K) [C, C], lower triangle with the diagonal: Σ_k k_ik k_jk e^(A_ik − A_jk)."""
    return intra_scores(gt, k, k, cd, mm)


def _keys_in(gt: Gates, k):
    """k ⊙ e^A: each key as the UT transform takes it (before β)."""
    A, _ = _decays(gt)
    return k if A is None else k * jnp.exp(A)


def ut_transform(spec: Spec, gt: Gates, k, v):
    """(W [C, K], U [C, V], T [C, C]) of the gated delta rule's WY/UT form."""
    mm, cd = matmul(spec.precise), spec.cd
    C = k.shape[0]
    L = jnp.where(_iota((C, C), 0) > _iota((C, C), 1), gt.beta * _gammas(gt, k, cd, mm), 0)
    T = ut_inverse(L, SUB, jnp.dtype(cd) != jnp.bfloat16)
    return mm(T, _keys_in(gt, k) * gt.beta, cd), mm(T, v * gt.beta, cd), T


def state_step(spec: Spec, S, k, u, w, extras):
    """One step of the sequential pass: S [K, BV] entering the chunk -> (vn, S leaving it).
    u: U (delta rule) or V (linear attention) [C, BV]; w: W [C, K] or None."""
    mm = matmul(spec.precise)
    Ks, d = key_decay(spec.gates(extras), k)
    vn = u - mm(w, S, spec.cd) if spec.delta else u
    return vn, d * S + mm(Ks, vn, spec.cd, ta=True)


def state_step_bwd(spec: Spec, dS, q, k, w, do, dvo, extras):
    """One reverse step: the cotangent of the state leaving the chunk -> of the one entering.
    dvo [C, BV] = Pᵀ do (`intra_dv`), needed by the delta rule only."""
    mm = matmul(spec.precise)
    gt = spec.gates(extras)
    Ks, d = key_decay(gt, k)
    dS_in = d * dS + mm(query_gate(gt, q * spec.scale), do, spec.cd, ta=True)
    if spec.delta:
        dvn = dvo + mm(Ks, dS, spec.cd)
        dS_in = dS_in - mm(w, dvn, spec.cd, ta=True)
    return dS_in


def chunk_output(spec: Spec, S, q, k, vn, extras):
    """o [C, BV] = Qe S_in + P vn."""
    mm = matmul(spec.precise)
    gt = spec.gates(extras)
    q = q * spec.scale
    return mm(query_gate(gt, q), S, spec.cd) + mm(intra_scores(gt, q, k, spec.cd, mm), vn, spec.cd)


def intra_dv(spec: Spec, q, k, do, extras):
    """Pᵀ do [C, BV]: the read-out's share of the cotangent of vn."""
    mm = matmul(spec.precise)
    P = intra_scores(spec.gates(extras), q * spec.scale, k, spec.cd, mm)
    return mm(P, do, spec.cd, ta=True)


# ----------------------------------------------------------------------------- the backward
def intra_scores_bwd(gt: Gates, q, k, dP, cd, mm):
    """(dq, dk) of P = `intra_scores`(q, k) under the cotangent dP [C, C] (entries above the
    diagonal ignored). The gates' share needs no third product: P_ij's exponent is
    A_i − A_j, so dA = q ⊙ dq − k ⊙ dk (per key; summed over keys for a scalar gate)."""
    C = q.shape[0]
    causal = _iota((C, C), 0) >= _iota((C, C), 1)
    if gt.Gk is not None:  # the masked elementwise form, as in `intra_scores`
        A, _ = _decays(gt)
        dPE = dP[:, :, None] * _masked_exp(A[:, None, :] - A[None, :, :], causal[:, :, None])
        return jnp.sum(dPE * k[None, :, :], axis=1), jnp.sum(dPE * q[:, None, :], axis=0)
    if gt.G is not None:
        dP = dP * _masked_exp(gt.G - _row(gt.G), causal)
    else:
        dP = jnp.where(causal, dP, 0)
    return mm(dP, k, cd), mm(dP, q, cd, ta=True)


def _gate_grads(spec: Spec, gt: Gates, dA, dA_last_row, dA_C):
    """The cotangents of the gate inputs (G, Gk, Gk_last; those the op has) from those of the
    decays: dA [C, K] per key, dA_last_row [1, K] (through `_last_row(A)`), dA_C (through
    A_C: [K, 1] with per-key gates, else [1, 1])."""
    C = dA.shape[0]
    last = _iota((C, 1), 0) == C - 1
    dA = dA + jnp.where(_iota(dA.shape, 0) == C - 1, dA_last_row, 0)
    out = []
    if spec.has_g:  # A = G (+ Gk): G's cotangent sums the keys
        dG = jnp.sum(dA, axis=1, keepdims=True)
        out.append(dG + jnp.where(last, jnp.sum(dA_C, axis=0, keepdims=True), 0))
    if spec.has_gk:
        out += [dA, dA_C]
    return out


def chunk_grads(spec: Spec, S, dS, T, q, k, v, vn, do, dvo, extras):
    """The chunk's backward written out: (dq, dk [C, K], dv [C, BV], the cotangents of the
    extras in `kinds` order), given the state entering it S and the cotangent of the one
    leaving it dS [K, BV], the forward's UT inverse T (delta rule; else None), vn (U − W S
    for the delta rule, v for linear attention), and dvo = Pᵀ do (delta rule, from
    `intra_dv`; None: computed here). With value tiles, dq, dk and the gates' cotangents are this tile's share (summed
    over tiles by the caller); dv is whole.

    Read-out and outgoing state: o = Qe S + P vn, S_out = d S + Ksᵀ vn give
        dvn = Pᵀ do + Ks dS,  dQe = do Sᵀ,  dKs = vn dSᵀ,  dP = do vnᵀ,  dd = Σ_v dS ⊙ S.
    Delta rule (vn = U − W S, W = T kb, U = T vb, kb = β e^A ⊙ k, vb = β ⊙ v, T = (I + L)⁻¹,
    L = strict_lower(β Γ(K, K))):
        dW = −dvn Sᵀ,  dkb = Tᵀ dW,  dvb = Tᵀ dvn,  dT = dW kbᵀ + dvn vbᵀ,
        dL = strict_lower(−Tᵀ dT Tᵀ) (`inverse_bwd`),  dΓ = β ⊙ dL,
        dβ = Σ_j dL ⊙ Γ + Σ_v dvb ⊙ v + Σ_k dkb ⊙ e^A k,  dv = β ⊙ dvb.
    Gates: every decay factor is e^(A_i − A_j) or e^(±A), so each product's share of dA is
    (its input) ⊙ (that input's cotangent), with the sign of the exponent."""
    mm, cd = matmul(spec.precise), spec.cd
    gt = spec.gates(extras)
    A, _ = _decays(gt)
    qs = q * spec.scale
    Ks, d = key_decay(gt, k)
    if dvo is None:
        dvo = mm(intra_scores(gt, qs, k, cd, mm), do, cd, ta=True)
    dvn = dvo + mm(Ks, dS, cd)
    dq, dk = intra_scores_bwd(gt, qs, k, mm(do, vn, cd, tb=True), cd, mm)
    dq_s, dk_s = mm(do, S, cd, tb=True), mm(vn, dS, cd, tb=True)   # dQe, dKs
    if A is not None:
        dA = qs * dq - k * dk
        dq_s, dk_s = dq_s * jnp.exp(A), dk_s * _to_end(A)
        dA = dA + qs * dq_s - k * dk_s
        dA_last_row = jnp.sum(k * dk_s, axis=0, keepdims=True)
        dd = jnp.sum(dS * S, axis=1, keepdims=True)
        dA_C = d * (dd if spec.has_gk else jnp.sum(dd, axis=0, keepdims=True))
    dq, dk = dq + dq_s, dk + dk_s
    dex = []
    if spec.delta:
        kin = _keys_in(gt, k)
        dW = -mm(dvn, S, cd, tb=True)
        dkb, dvb = mm(T, dW, cd, ta=True), mm(T, dvn, cd, ta=True)
        dT = mm(dW, kin * gt.beta, cd, tb=True) + mm(dvn, v * gt.beta, cd, tb=True)
        dL = inverse_bwd(T, dT, jnp.dtype(cd) != jnp.bfloat16)
        dkin = dkb * gt.beta
        dk = dk + (dkin if A is None else dkin * jnp.exp(A))
        dq_g, dk_g = intra_scores_bwd(gt, k, k, gt.beta * dL, cd, mm)
        dk = dk + dq_g + dk_g
        if A is not None:
            dA = dA + kin * dkin + k * (dq_g - dk_g)
        dbeta = (jnp.sum(dvb * v, axis=1, keepdims=True)
                 + jnp.sum(dkb * kin, axis=1, keepdims=True)
                 + jnp.sum(dL * _gammas(gt, k, cd, mm), axis=1, keepdims=True))
        dex.append(dbeta)
        dv = dvb * gt.beta
    else:
        dv = dvn
    if A is None:
        return dq * spec.scale, dk, dv, dex
    dex += _gate_grads(spec, gt, dA, dA_last_row, dA_C)
    return dq * spec.scale, dk, dv, dex
