"""Chunked linear attention in plain jnp (any backend): the workhorse on CPU.

Per chunk of C tokens with log decays a_t (the per-head g_t, plus the per-key gk_t when given)
and their within-chunk cumulative sums A_i = Σ_{t≤i} a_t (A ≤ 0, decreasing):

    o_i   = (q_i ⊙ e^{A_i})ᵀ S_in + Σ_{j≤i} [Σ_k q_ik k_jk e^{A_ik − A_jk}] v_j
    S_out = diag(e^{A_C}) S_in + Σ_j (k_j ⊙ e^{A_C − A_j}) v_jᵀ

Every exponent above is ≤ 0. The intra-chunk scores P_ij (i ≥ j) are, for a per-head decay,
(Q Kᵀ) ⊙ exp(masked(G_i − G_j)). With per-key decays, exp(A_i)·exp(−A_j) would overflow
(gk = −20 per token gives A ≈ −1280 over a chunk), so the scores come from
`pallas_kernels.chunked.per_key_scores` (sub-chunks with a reference point each).

The chunk scan, the custom backward and the sequence bookkeeping are in `pallas_kernels.chunked`.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.scan.chunked import (GROUP_GK, SUB, masked_decay, per_key_scores,
                                    run_chunked)


def _intra(x, sub: int = SUB):
    """Per-chunk affine map (M, B, Qeff, O) of linear attention; x holds one chunk [C, ...]."""
    q, k, v = x["q"], x["k"], x["v"]
    if "gk" in x:
        a = x["gk"] + (x["g"][..., None] if "g" in x else 0.0)
        A = jnp.cumsum(a, axis=-2)                               # [.., C, K]
        P = per_key_scores(q, k, A, sub)
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
