"""The gated delta rule, the recurrence itself: a `lax.scan` over tokens (plain and slow).

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)

g = None is DeltaNet. The single-token update below is also the decoding step
(`gated_delta_rule_step`).
"""
from __future__ import annotations

import jax.numpy as jnp

from .. import common


def gated_delta_rule_update(S, q, k, v, beta, g=None, *, scale):
    """One token: S [..., K, V], q/k [..., K], v [..., V], beta/g [...] (all in the
    accumulation dtype) -> (o [..., V], new S)."""
    if g is not None:
        S = S * jnp.exp(g)[..., None, None]
    # (I − β k kᵀ) S + β k vᵀ  =  S + k (β (v − Sᵀk))ᵀ : the delta rule's correction.
    u = beta[..., None] * (v - jnp.einsum("...k,...kv->...v", k, S))
    S = S + k[..., :, None] * u[..., None, :]
    o = jnp.einsum("...k,...kv->...v", scale * q, S)
    return o, S


def gated_delta_rule_reference(q, k, v, beta, g, *, scale, initial_state, cu_seqlens):
    """q, k [B,T,H,K], v [B,T,H,V], beta [B,T,H], g [B,T,H] | None, initial_state
    [N,H,K,V] | None -> (o [B,T,H,V] in q's dtype, final state [N,H,K,V] in acc dtype)."""
    _, _, H, K = q.shape
    V = v.shape[-1]

    def update(S, q, k, v, beta, g):
        return gated_delta_rule_update(S, q, k, v, beta, g, scale=scale)

    o, state = common.token_scan(update, (q, k, v, beta, g), (H, K, V), common.acc_dtype(q),
                                 initial_state, cu_seqlens)
    return o.astype(q.dtype), state
