"""Linear attention, the recurrence itself: a `lax.scan` over tokens (plain and slow).

    S_t = diag(exp(gk_t)) · exp(g_t) · S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

The single-token update below is also the decoding step (`linear_attention_step`).
"""
from __future__ import annotations

import jax.numpy as jnp

from .. import common


def linear_attention_update(S, q, k, v, g=None, gk=None, *, scale):
    """One token: S [..., K, V], q/k [..., K], v [..., V], g [...], gk [..., K] (all in the
    accumulation dtype) -> (o [..., V], new S)."""
    if g is not None:
        S = S * jnp.exp(g)[..., None, None]
    if gk is not None:
        S = S * jnp.exp(gk)[..., :, None]
    S = S + k[..., :, None] * v[..., None, :]
    o = jnp.einsum("...k,...kv->...v", scale * q, S)
    return o, S


def linear_attention_reference(q, k, v, g, gk, *, scale, initial_state, cu_seqlens):
    """q, k [B,T,H,K], v [B,T,H,V], g [B,T,H] | None, gk [B,T,H,K] | None, initial_state
    [N,H,K,V] | None -> (o [B,T,H,V] in q's dtype, final state [N,H,K,V] in acc dtype)."""
    _, _, H, K = q.shape
    V = v.shape[-1]

    def update(S, q, k, v, g, gk):
        return linear_attention_update(S, q, k, v, g, gk, scale=scale)

    o, state = common.token_scan(update, (q, k, v, g, gk), (H, K, V), common.acc_dtype(q),
                                 initial_state, cu_seqlens)
    return o.astype(q.dtype), state
