"""Chunked gated delta rule in plain jnp (any backend), via the WY / UT transform.

Write the recurrence S_t = (I − β_t k_t k_tᵀ) D_t S_{t−1} + β_t k_t v_tᵀ, with the decay
D_t = Diag(e^{a_t}) (a_t = g_t for every key, gk_t per key (KDA), or their sum), as
S_t = D_t S_{t−1} + k_t u_tᵀ with u_t = β_t (v_t − k_tᵀ D_t S_{t−1}). Inside a chunk, with the
within-chunk cumulative log decays A_i = Σ_{t≤i} a_t ([C] per head or [C, K] per key) and the
decayed inner products Γ(X, Y)_ij = Σ_k x_ik y_jk e^{A_ik − A_jk} (i ≥ j; for a per-head decay
(X Yᵀ) ⊙ exp(G_i − G_j), masked before exp):

    (I + L) U = diag(β) V − diag(β) (K ⊙ e^{A}) S_in,   L = strictly_lower(diag(β) Γ(K, K))

so U = Ũ − W S_in with [Ũ, W] = (I + L)⁻¹ [β ⊙ V, β ⊙ K ⊙ e^{A}] (the unit lower inverse by
recursive doubling, see `unit_lower_inverse`), and then, with P = Γ(Q, K) (diagonal
included) and Kd = K ⊙ e^{A_C − A}:

    o     = (Q ⊙ e^{A} − P W) S_in + P Ũ
    S_out = (Diag(e^{A_C}) − Kdᵀ W) S_in + Kdᵀ Ũ

an affine map of the incoming state, which `pallas_kernels.chunked` scans over chunks (with the
custom backward that recomputes inside chunks). Per-key decays put the decay inside the UT
transform (L and W, as fla's chunk_kda); their Γ comes from `chunked.per_key_scores`
(sub-chunks of 16 tokens, each against its own reference position, so no exponent is
positive). g = gk = None is DeltaNet (no decay).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.scan.chunked import GROUP_GK, SUB, masked_decay, per_key_scores, run_chunked


def _diag_blocks(X: jax.Array, b: int) -> jax.Array:
    """The diagonal b×b blocks of X [..., C, C], as [..., C/b, b, b]."""
    *lead, C, _ = X.shape
    d = jnp.diagonal(X.reshape(*lead, C // b, b, C // b, b), axis1=-4, axis2=-2)
    return jnp.moveaxis(d, -1, -3)


@jax.custom_vjp
def unit_lower_inverse(L: jax.Array) -> jax.Array:
    """(I + L)⁻¹ for strictly lower triangular L [..., C, C], C a power of two.

    Recursive doubling with matmuls only: the inverse of [[A, 0], [B, D]] (A, D unit lower) is
    [[A⁻¹, 0], [−D⁻¹ B A⁻¹, D⁻¹]], applied to the diagonal blocks of size 1, 2, 4, … C/2. On CPU
    this is far faster than `solve_triangular`. Its vjp is the closed form of d(A⁻¹) = −A⁻¹ dA A⁻¹:
    dL = strictly_lower(−A⁻ᵀ dX A⁻ᵀ), two matmuls.
    """
    *lead, C, _ = L.shape
    inv = jnp.ones((*lead, C, 1, 1), L.dtype)        # inverses of the 1×1 diagonal blocks
    s = 1
    while s < C:
        A, D = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        B = _diag_blocks(L, 2 * s)[..., s:, :s]          # [..., C/2s, s, s]
        X = -jnp.einsum("...ij,...jk,...kl->...il", D, B, A)
        zeros = jnp.zeros_like(A)
        inv = jnp.concatenate([jnp.concatenate([A, zeros], -1),
                               jnp.concatenate([X, D], -1)], -2)
        s *= 2
    return inv[..., 0, :, :]


def _unit_lower_inverse_fwd(L):
    X = unit_lower_inverse(L)
    return X, X


def _unit_lower_inverse_bwd(X, dX):
    Xt = jnp.swapaxes(X, -1, -2)
    return (-jnp.tril(Xt @ dX @ Xt, -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _intra(x):
    """Per-chunk affine map (M, B, Qeff, O) of the gated delta rule; x holds one chunk [C, ...]."""
    if "gk" in x:
        return _intra_per_key(x)
    q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
    C, K = k.shape
    if "g" in x:
        G = jnp.cumsum(x["g"], axis=-1)                          # [.., C]
        gamma = masked_decay(G)                                  # [.., C, C], lower incl. diag
        eG = jnp.exp(G)[..., None]
        decay_end = jnp.exp(G[..., -1:] - G)[..., None]
        eGC = jnp.exp(G[..., -1])
    else:
        gamma = jnp.tril(jnp.ones((C, C), k.dtype))
        eG = decay_end = eGC = 1.0
    # Stacked operands: one matmul gives both Q Kᵀ and K Kᵀ, one P·[Ũ, W], one Kdᵀ·[Ũ, W].
    qk, kk = jnp.split(jnp.einsum("ik,jk->ij", jnp.concatenate([q, k], axis=0), k), 2, axis=0)
    strict = jnp.tril(jnp.ones((C, C), k.dtype), -1)
    L = (beta[:, None] * strict) * gamma * kk
    rhs = jnp.concatenate([beta[:, None] * v, (beta[:, None] * eG) * k], axis=-1)
    sol = unit_lower_inverse(L) @ rhs                            # [Ũ, W]: [C, V + K]
    P = gamma * qk
    PS, KS = P @ sol, (k * decay_end).T @ sol
    V = v.shape[-1]
    Qeff = q * eG - PS[:, V:]
    O = PS[:, :V]
    M = eGC * jnp.eye(K, dtype=k.dtype) - KS[:, V:]
    Bst = KS[:, :V]
    return M, Bst, Qeff, O


def _intra_per_key(x, sub: int = SUB):
    """`_intra` with per-key log decays gk [C, K] (plus a per-head g [C] if given): KDA."""
    q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
    C, K = k.shape
    a = x["gk"] + (x["g"][:, None] if "g" in x else 0.0)
    A = jnp.cumsum(a, axis=0)                                    # [C, K]
    strict = jnp.tril(jnp.ones((C, C), k.dtype), -1)
    L = (beta[:, None] * strict) * per_key_scores(k, k, A, sub)
    rhs = jnp.concatenate([beta[:, None] * v, beta[:, None] * jnp.exp(A) * k], axis=-1)
    sol = unit_lower_inverse(L) @ rhs                            # [Ũ, W]: [C, V + K]
    P = per_key_scores(q, k, A, sub)
    PS, KS = P @ sol, (k * jnp.exp(A[-1:] - A)).T @ sol
    V = v.shape[-1]
    Qeff = q * jnp.exp(A) - PS[:, V:]
    O = PS[:, :V]
    M = jnp.diag(jnp.exp(A[-1])) - KS[:, V:]
    Bst = KS[:, :V]
    return M, Bst, Qeff, O


def gated_delta_rule_xla(q, k, v, beta, g, gk=None, *, scale, initial_state, cu_seqlens,
                         chunk_size):
    """Chunked gated delta rule; arguments already validated. Returns (o, final_state [N,H,K,V])."""
    return run_chunked(_intra, {"q": q, "k": k, "v": v, "beta": beta, "g": g, "gk": gk}, q=q,
                       scale=scale, value_dim=v.shape[-1], initial_state=initial_state,
                       cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                       **({} if gk is None else {"group": GROUP_GK}))
