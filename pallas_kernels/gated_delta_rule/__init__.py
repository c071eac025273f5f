"""The gated delta rule: `gated_delta_rule` over a sequence, `gated_delta_rule_step` for decoding.

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)

g [B,T,H] is a natural-log decay (≤ 0; None gives DeltaNet), β [B,T,H] the write strength in
[0, 1]. With use_qk_l2norm, q and k are L2-normalised over K first (as Gated DeltaNet does).
"""
from __future__ import annotations

from .. import common
from .reference import gated_delta_rule_update


def gated_delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, use_qk_l2norm=False,
                     impl="auto", chunk_size=64):
    """o [B,T,H,V] (q's dtype), and the final state [N,H,K,V] (float32) if output_final_state.

    q, k [B,T,H,K]; v [B,T,H,V]; beta, g [B,T,H]; initial_state [N,H,K,V] with N = B, or N
    packed sequences given by cu_seqlens int32 [N+1] in a B == 1 batch.
    impl: "auto" | "reference" | "xla" | "pallas".
    """
    B, T, H, K, V = common.check_qkv(q, k, v)
    common.check_array("beta", beta, (B, T, H), "[B, T, H]")
    common.check_array("g", g, (B, T, H), "[B, T, H]", allow_none=True)
    N = common.check_cu_seqlens(cu_seqlens, B) or B
    common.check_initial_state(initial_state, N, H, K, V)
    common.check_chunk_size(chunk_size)
    fn = common.select_impl(__name__, "gated_delta_rule", impl, chunk_size)
    if use_qk_l2norm:
        q, k = common.l2_normalize(q), common.l2_normalize(k)
    o, state = fn(q, k, v, beta, g, scale=common.default_scale(scale, K),
                  initial_state=initial_state, cu_seqlens=cu_seqlens)
    return o, (state if output_final_state else None)


def gated_delta_rule_step(q, k, v, beta, g=None, *, scale=None, state, use_qk_l2norm=False):
    """One decoding token: q, k [B,H,K], v [B,H,V], beta, g [B,H], state [B,H,K,V]
    -> (o [B,H,V] in q's dtype, new state [B,H,K,V] in float32)."""
    B, H, K, V = common.check_qkv(q, k, v, step=True)
    common.check_array("beta", beta, (B, H), "[B, H]")
    common.check_array("g", g, (B, H), "[B, H]", allow_none=True)
    common.check_array("state", state, (B, H, K, V), "[B, H, K, V]")
    if use_qk_l2norm:
        q, k = common.l2_normalize(q), common.l2_normalize(k)
    acc = common.acc_dtype(q)
    o, state = gated_delta_rule_update(
        *common.cast(acc, state, q, k, v, beta, g), scale=common.default_scale(scale, K))
    return o.astype(q.dtype), state


__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
