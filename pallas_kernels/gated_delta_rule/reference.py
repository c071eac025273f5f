"""The gated delta rule, the recurrence itself: a `lax.scan` over tokens (plain and slow).

    S_t = (I − β_t k_t k_tᵀ) D_t S_{t-1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)
    D_t = exp(g_t) · Diag(exp(gk_t))

g = gk = None is DeltaNet, g alone Gated DeltaNet, gk (per key) Kimi Delta Attention. The
decay comes first, then the delta update reads the decayed state (fla's naive_recurrent_kda).
The single-token update below is also the decoding step (`gated_delta_rule_step`).
"""
from __future__ import annotations

import jax.numpy as jnp

from .. import common


def gated_delta_rule_update(S, q, k, v, beta, g=None, gk=None, *, scale):
    """One token: S [..., K, V], q/k [..., K], v [..., V], beta/g [...], gk [..., K] (all in
    the accumulation dtype) -> (o [..., V], new S)."""
    if g is not None:
        S = S * jnp.exp(g)[..., None, None]
    if gk is not None:
        S = S * jnp.exp(gk)[..., :, None]
    # (I − β k kᵀ) S + β k vᵀ  =  S + k (β (v − Sᵀk))ᵀ : the delta rule's correction.
    u = beta[..., None] * (v - jnp.einsum("...k,...kv->...v", k, S))
    S = S + k[..., :, None] * u[..., None, :]
    o = jnp.einsum("...k,...kv->...v", scale * q, S)
    return o, S


def gated_delta_rule_reference(q, k, v, beta, g, gk=None, *, scale, initial_state,
                               cu_seqlens):
    """q, k [B,T,H,K], v [B,T,H,V], beta [B,T,H], g [B,T,H] | None, gk [B,T,H,K] | None,
    initial_state [N,H,K,V] | None -> (o [B,T,H,V] in q's dtype, final state [N,H,K,V] in
    acc dtype)."""
    _, _, H, K = q.shape
    V = v.shape[-1]

    def update(S, q, k, v, beta, g, gk):
        return gated_delta_rule_update(S, q, k, v, beta, g, gk, scale=scale)

    o, state = common.token_scan(update, (q, k, v, beta, g, gk), (H, K, V),
                                 common.acc_dtype(q), initial_state, cu_seqlens)
    return o.astype(q.dtype), state
