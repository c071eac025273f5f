"""Linear attention: `linear_attention` over a sequence and `linear_attention_step` for decoding.

    S_t = diag(exp(gk_t)) · exp(g_t) · S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

g [B,T,H] is a per-head log decay (RetNet, Lightning, Mamba2-SSD), gk [B,T,H,K] a per-key one
(GLA); both natural-log, ≤ 0. Without either it is vanilla linear attention.
"""
from __future__ import annotations

from .. import common
from .reference import linear_attention_update


def linear_attention(q, k, v, g=None, gk=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, impl="auto", chunk_size=64):
    """o [B,T,H,V] (q's dtype), and the final state [N,H,K,V] (float32) if output_final_state.

    q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H]; gk [B,T,H,K]; initial_state [N,H,K,V] with N = B,
    or N packed sequences given by cu_seqlens int32 [N+1] in a B == 1 batch.
    impl: "auto" | "reference" | "xla" | "pallas".
    """
    B, T, H, K, V = common.check_qkv(q, k, v)
    common.check_array("g", g, (B, T, H), "[B, T, H]", allow_none=True)
    common.check_array("gk", gk, (B, T, H, K), "[B, T, H, K]", allow_none=True)
    N = common.check_cu_seqlens(cu_seqlens, B) or B
    common.check_initial_state(initial_state, N, H, K, V)
    common.check_chunk_size(chunk_size)
    fn = common.select_impl(__name__, "linear_attention", impl, chunk_size)
    o, state = fn(q, k, v, g, gk, scale=common.default_scale(scale, K),
                  initial_state=initial_state, cu_seqlens=cu_seqlens)
    return o, (state if output_final_state else None)


def linear_attention_step(q, k, v, g=None, gk=None, *, scale=None, state):
    """One decoding token: q, k [B,H,K], v [B,H,V], g [B,H], gk [B,H,K], state [B,H,K,V]
    -> (o [B,H,V] in q's dtype, new state [B,H,K,V] in float32)."""
    B, H, K, V = common.check_qkv(q, k, v, step=True)
    common.check_array("g", g, (B, H), "[B, H]", allow_none=True)
    common.check_array("gk", gk, (B, H, K), "[B, H, K]", allow_none=True)
    common.check_array("state", state, (B, H, K, V), "[B, H, K, V]")
    acc = common.acc_dtype(q)
    o, state = linear_attention_update(
        *common.cast(acc, state, q, k, v, g, gk), scale=common.default_scale(scale, K))
    return o.astype(q.dtype), state


__all__ = ["linear_attention", "linear_attention_step"]
