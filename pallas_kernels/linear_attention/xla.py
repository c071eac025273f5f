"""Chunked linear attention in plain jnp (any backend): the workhorse on CPU.

Per chunk of C tokens with log decays a_t (the per-head g_t, plus the per-key gk_t when given)
and their within-chunk cumulative sums A_i = Σ_{t≤i} a_t (A ≤ 0, decreasing):

    o_i   = (q_i ⊙ e^{A_i})ᵀ S_in + Σ_{j≤i} [Σ_k q_ik k_jk e^{A_ik − A_jk}] v_j
    S_out = diag(e^{A_C}) S_in + Σ_j (k_j ⊙ e^{A_C − A_j}) v_jᵀ

Every exponent above is ≤ 0. The intra-chunk scores P_ij (i ≥ j) are, for a per-head decay,
(Q Kᵀ) ⊙ exp(masked(G_i − G_j)). With per-key decays, exp(A_i)·exp(−A_j) would overflow
(gk = −20 per token gives A ≈ −1280 over a chunk), so the chunk is cut into sub-chunks of `SUB`
tokens: a query block against earlier blocks uses the block's first position r as reference,
q_i e^{A_i − r} · k_j e^{r − A_j} (both factors ≤ 1), and the diagonal blocks use the masked
elementwise form Σ_k q_ik k_jk e^{A_ik − A_jk}.

The chunk scan, the custom backward and the sequence bookkeeping are in `pallas_kernels.chunked`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chunked import masked_decay, run_chunked

SUB = 16  # sub-chunk length for per-key decays
GROUP_GK = 16  # chunks per batched call with per-key decays: XLA keeps [SUB, SUB, K] products


def _decay(A: jax.Array) -> tuple:
    """(causal mask [s, s], E [..., s, s, K] = exp(A_ik − A_jk) for i ≥ j, 1 above)."""
    s = A.shape[-2]
    causal = jnp.tril(jnp.ones((s, s), A.dtype))
    return causal, jnp.exp((A[..., :, None, :] - A[..., None, :, :]) * causal[:, :, None])


@jax.custom_vjp
def _diag_scores(q: jax.Array, k: jax.Array, A: jax.Array) -> jax.Array:
    """D_ij = Σ_k q_ik k_jk exp(A_ik − A_jk) for i ≥ j (0 above), q, k, A: [..., s, K].

    The mask multiplies the exponent (masked entries are exp(0), zeroed afterwards): XLA fuses
    the exp into the product and the reduction, so no [s, s, K] array is stored, here or in the
    hand-written backward (autodiff would keep several)."""
    causal, E = _decay(A)
    return causal * jnp.sum(q[..., :, None, :] * k[..., None, :, :] * E, axis=-1)


def _diag_scores_fwd(q, k, A):
    return _diag_scores(q, k, A), (q, k, A)


def _diag_scores_bwd(res, dD):
    q, k, A = res
    causal, E = _decay(A)
    G = (dD * causal)[..., None]                                 # [.., s, s, 1]
    dq = jnp.sum(G * k[..., None, :, :] * E, axis=-2)
    dk = jnp.sum(G * q[..., :, None, :] * E, axis=-3)
    W = G * q[..., :, None, :] * k[..., None, :, :] * E          # d D_ij / d A_ik, per k
    dA = jnp.sum(W, axis=-2) - jnp.sum(W, axis=-3)
    return dq, dk, dA


_diag_scores.defvjp(_diag_scores_fwd, _diag_scores_bwd)


def _per_key_scores(q: jax.Array, k: jax.Array, A: jax.Array, sub: int) -> jax.Array:
    """P_ij = Σ_k q_ik k_jk exp(A_ik − A_jk) for i ≥ j, 0 above; q, k, A: [..., C, K]."""
    *lead, C, K = q.shape
    s = min(sub, C)
    n = C // s
    qb = q.reshape(*lead, n, s, K)
    Ab = A.reshape(*lead, n, s, K)
    r = Ab[..., :, :1, :]                                       # [.., n, 1, K] block references
    # Masks multiply the exponent (0 where masked: exp(0) = 1, zeroed afterwards) rather than
    # selecting -inf: XLA fuses the product into the exp and the reduction, not the select.
    # Earlier blocks: q_i e^{A_i − r_a} · k_j e^{r_a − A_j}, j before block a (exponents ≤ 0).
    before = (jnp.arange(C)[None, :] < (jnp.arange(n) * s)[:, None]).astype(q.dtype)[:, :, None]
    k_ref = k[..., None, :, :] * jnp.exp((r - A[..., None, :, :]) * before) * before
    off = jnp.einsum("...aik,...ajk->...aij", qb * jnp.exp(Ab - r), k_ref)  # [.., n, s, C]
    # Diagonal blocks: the masked elementwise form, one fused multiply-exp-reduce.
    diag = _diag_scores(qb, k.reshape(*lead, n, s, K), Ab)
    eye = jnp.eye(n, dtype=q.dtype)
    off = off.reshape(*lead, n, s, n, s) + diag[..., :, :, None, :] * eye[:, None, :, None]
    return off.reshape(*lead, C, C)


def _intra(x, sub: int = SUB):
    """Per-chunk affine map (M, B, Qeff, O) of linear attention; x holds one chunk [C, ...]."""
    q, k, v = x["q"], x["k"], x["v"]
    if "gk" in x:
        a = x["gk"] + (x["g"][..., None] if "g" in x else 0.0)
        A = jnp.cumsum(a, axis=-2)                               # [.., C, K]
        P = _per_key_scores(q, k, A, sub)
        Qeff = q * jnp.exp(A)
        M = jnp.exp(A[..., -1, :])                               # diagonal transition [.., K]
        Kd = k * jnp.exp(A[..., -1:, :] - A)
    elif "g" in x:
        G = jnp.cumsum(x["g"], axis=-1)                          # [.., C]
        P = jnp.einsum("...ik,...jk->...ij", q, k) * masked_decay(G)
        Qeff = q * jnp.exp(G)[..., None]
        M = jnp.exp(G[..., -1])                                  # scalar transition [..]
        Kd = k * jnp.exp(G[..., -1:] - G)[..., None]
    else:
        C = q.shape[-2]
        P = jnp.einsum("...ik,...jk->...ij", q, k) * jnp.tril(jnp.ones((C, C), q.dtype))
        Qeff, M, Kd = q, jnp.ones(q.shape[:-2], q.dtype), k
    O = jnp.einsum("...ij,...jv->...iv", P, v)
    Bst = jnp.einsum("...ck,...cv->...kv", Kd, v)
    return M, Bst, Qeff, O


def linear_attention_xla(q, k, v, g, gk, *, scale, initial_state, cu_seqlens, chunk_size):
    """Chunked linear attention; arguments already validated. Returns (o, final_state [N,H,K,V])."""
    return run_chunked(_intra, {"q": q, "k": k, "v": v, "g": g, "gk": gk}, q=q, scale=scale,
                       value_dim=v.shape[-1], initial_state=initial_state,
                       cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                       **({} if gk is None else {"group": GROUP_GK}))
