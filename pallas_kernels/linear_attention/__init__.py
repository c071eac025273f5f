"""Linear attention: `linear_attention` over a sequence and `linear_attention_step` for decoding.

    S_t = diag(exp(gk_t)) · exp(g_t) · S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

g [B,T,H] is a per-head log decay (RetNet, Lightning, Mamba2-SSD), gk [B,T,H,K] a per-key one
(GLA); both natural-log, ≤ 0. Without either it is vanilla linear attention.

Inputs and bad values: as for every recurrent op, see `pallas_kernels.common.INPUT_CONTRACT`.
Arrays may be JAX (traced or not) or NumPy, eager or under jit; a bad rank, shape or dtype is
a ValueError naming the argument before anything runs. Values are not checked (except concrete
`cu_seqlens`): a finite positive gate is computed as written; NaN/inf inputs return and
propagate within their own sequence only.
"""
from __future__ import annotations

from .. import common
from ..scan import context_parallel
from .reference import linear_attention_update


# The array arguments that may be None.
_OPTIONAL = ("g", "gk", "initial_state", "cu_seqlens")


def linear_attention(q, k, v, g=None, gk=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, impl="auto", chunk_size=64,
                     context_axis=None):
    """o [B,T,H,V] (q's dtype), and the final state [N,H,K,V] (float32) if output_final_state.

    q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H]; gk [B,T,H,K]; initial_state [N,H,K,V] with N = B,
    or N packed sequences given by cu_seqlens int [N+1] in a B == 1 batch (concrete offsets
    must satisfy 0 = cu[0] <= ... <= cu[N] <= T; tokens past cu[N] get o = 0).
    impl: "auto" | "reference" | "xla" | "pallas".

    Context parallelism: with `context_axis` (a mesh axis name), call the op inside
    `jax.shard_map` with T split contiguously over that axis (device d holds tokens
    [d·T, (d+1)·T) in `lax.axis_index` order) and initial_state / cu_seqlens replicated
    (cu_seqlens then holds global offsets, up to D·T). Each device gets its slice of o and
    every device the state after the whole sequence: outputs, final state and gradients are
    the unsharded op's. Devices exchange only [N,H,K,V+K] state maps (an all-gather, plus a
    psum of the final state), never tokens; the local op runs at value width V + K. See
    `pallas_kernels.context_parallel`. An axis not bound here is a ValueError. impl "pallas"
    in interpret mode (CPU) needs shard_map(..., check_vma=False): JAX's interpreter does
    not support replication checks.
    """
    q, k, v, g, gk, initial_state, cu_seqlens = common.as_inputs(
        _OPTIONAL,
        q=q, k=k, v=v, g=g, gk=gk, initial_state=initial_state, cu_seqlens=cu_seqlens)
    B, T, H, K, V = common.check_qkv(q, k, v)
    common.check_array("g", g, (B, T, H), "[B, T, H]", allow_none=True)
    common.check_array("gk", gk, (B, T, H, K), "[B, T, H, K]", allow_none=True)
    D = context_parallel.context_size(context_axis) or 1
    N = common.check_cu_seqlens(cu_seqlens, B, T * D) or B
    common.check_initial_state(initial_state, N, H, K, V)
    chunk_size = common.check_chunk_size(chunk_size)
    scale = common.check_scale(scale, K)
    output_final_state = common.check_flag("output_final_state", output_final_state)
    fn = common.select_impl(__name__, "linear_attention", impl, chunk_size)
    q, k, v, g, gk, initial_state, cu_seqlens = common.to_jax(
        q, k, v, g, gk, initial_state, cu_seqlens)
    if B * T == 0:
        o, state = common.empty_result(q, (B, T, H, K, V), N, initial_state)
        return o, (state if output_final_state else None)

    def run(v, initial_state, cu_seqlens):
        return fn(q, k, v, g, gk, scale=scale, initial_state=initial_state,
                  cu_seqlens=cu_seqlens)

    if context_axis is not None:
        return context_parallel.run_over_context(
            run, v, initial_state, cu_seqlens, context_axis=context_axis, num_states=N, K=K,
            acc=common.acc_dtype(q), output_final_state=output_final_state)
    o, state = run(v, initial_state, cu_seqlens)
    return o, (state if output_final_state else None)


def linear_attention_step(q, k, v, g=None, gk=None, *, scale=None, state):
    """One decoding token: q, k [B,H,K], v [B,H,V], g [B,H], gk [B,H,K], state [B,H,K,V]
    -> (o [B,H,V] in q's dtype, new state [B,H,K,V] in float32)."""
    q, k, v, g, gk, state = common.as_inputs(
        _OPTIONAL, q=q, k=k, v=v, g=g, gk=gk, state=state)
    B, H, K, V = common.check_qkv(q, k, v, step=True)
    common.check_array("g", g, (B, H), "[B, H]", allow_none=True)
    common.check_array("gk", gk, (B, H, K), "[B, H, K]", allow_none=True)
    common.check_array("state", state, (B, H, K, V), "[B, H, K, V]")
    scale = common.check_scale(scale, K)
    q, k, v, g, gk, state = common.to_jax(q, k, v, g, gk, state)
    acc = common.acc_dtype(q)
    o, state = linear_attention_update(*common.cast(acc, state, q, k, v, g, gk), scale=scale)
    return o.astype(q.dtype), state


__all__ = ["linear_attention", "linear_attention_step"]
