"""Context parallelism for the recurrent ops: T sharded contiguously over a mesh axis.

`linear_attention(..., context_axis="context")` and `gated_delta_rule(..., context_axis=...)`
are called inside `jax.shard_map` with the T axis of q, k, v, the gates and β split into D
contiguous slices over the named axis (device d holds tokens [d·T, (d+1)·T) of a D·T-token
sequence, in the order of `lax.axis_index`). `initial_state` and `cu_seqlens` are replicated
(every device passes the state entering the whole sequence, and the global offsets); each
device gets its own slice of o, and every device gets the state after the whole sequence.
Outputs, final state and gradients are those of the unsharded op on the whole sequence.

How: the state leaving a slice is affine in the state entering it, S_out = M·S_in + B (M the
product of the slice's K×K token transitions). One local run of the op with the values widened
by K zero columns and the initial state [0 | I_K] yields, as its final state, [B | M], and as
the extra K output columns the coefficient of S_in in each output, P_tᵀ(scale·q_t) (P_t the
product of transitions up to t); the first V output columns are the outputs from a zero
state. So one local run at value width V + K gives everything:

    all_gather [B | M] over the axis          N·H·K·(K+V) floats per device
    E_d = S_{d-1},  S_d = M_d S_{d-1} + B_d   a D-step loop over the gathered maps (every device)
    o   = o_aug[:V] + o_aug[V:] · E_d         one [T, K] x [K, V] product per head
    final state = psum of the last device's S_{D-1} (N·H·K·V floats; only if asked for)

Cost against the local op on the slice: the op runs at value width V + K instead of V (for
K = V about twice the state-pass and read-out work; the scores and the delta rule's UT
solve, which do not depend on V, are unchanged), plus O(T·H·K·V) for the correction and
O(D·N·H·K²·V) for the combine. Communication is independent of T. JAX transposes the
collectives for the backward (all_gather -> reduce-scatter, psum -> psum); shard_map sums the
replicated initial state's gradient over the devices (with check_vma on or off).

Replication checks (`shard_map(..., check_vma=True)`, the default) are supported: the scans'
constant carries and the Pallas calls' outputs are typed as varying where their inputs are
(`common.match_vma`, `common.varying_call`), and the final state is a psum, so it may be
returned with out_specs P(). One exception, JAX's and not ours: Pallas' interpret mode (impl
"pallas" on CPU) cannot run under replication checks (JAX 0.10's interpreter raises "requires
varying manual axes to match"), so there use check_vma=False.

Packed documents (`cu_seqlens`, global offsets into the D·T-token row, B == 1): each device runs
the local op on its slice's pieces of the N documents (offsets clip(cu − d·T, 0, T); a document
not on the slice is an empty piece, which keeps its initial state). A document starting at or
after the slice's first token (a reset) starts from its own initial state, so its local
initial state is [h0_n | 0]: M = 0 and B = its state at the slice's end. Only the document that
holds the slice's first token and began earlier starts from [0 | I]. The combine is then the
same for every document, and the output correction needs only that one document's entering
state.

With bfloat16 q the output is the sum of two parts each rounded to bfloat16 (the local part
and the read-out of the entering state), not one rounding of the sum.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax


def context_size(context_axis) -> Optional[int]:
    """The number D of devices along `context_axis` (None when it is None).

    ValueError naming `context_axis` when the axis is not bound here, i.e. the op is not
    called inside `jax.shard_map` (or a `vmap` with that axis_name) over it."""
    if context_axis is None:
        return None
    try:
        size = lax.axis_size(context_axis) if hasattr(lax, "axis_size") else lax.psum(
            1, context_axis)
        return int(size)
    except NameError as e:
        raise ValueError(
            f"`context_axis` {context_axis!r} is not a bound axis name here ({e}): call the op "
            "inside jax.shard_map over a mesh with that axis, T sharded over it") from None


def run_over_context(run: Callable, v: jax.Array, initial_state: Optional[jax.Array],
                     cu_seqlens: Optional[jax.Array], *, context_axis, num_states: int, K: int,
                     acc, output_final_state: bool) -> tuple:
    """The op on the whole D·T-token sequence, from this device's T-token slice.

    run(v, initial_state, cu_seqlens) -> (o, final state) is the validated local op (any
    impl) on this device's tokens with the other inputs bound; v [B, T, H, V] this device's
    values; initial_state [N, H, K, V] | None and cu_seqlens [N+1] | None the replicated
    global ones. Returns (this device's o [B, T, H, V], the final state after the whole
    sequence [N, H, K, V] (None unless output_final_state), the same on every device)."""
    D = context_size(context_axis)
    if D == 1:
        o, state = run(v, initial_state, cu_seqlens)
        return o, (state if output_final_state else None)
    B, T, H, V = v.shape
    N = num_states
    d = lax.axis_index(context_axis)
    off = (d * T).astype(jnp.int32)
    init = (jnp.zeros((N, H, K, V), acc) if initial_state is None
            else initial_state.astype(acc))
    if cu_seqlens is None:
        reset = jnp.broadcast_to(d == 0, (N,))
        cu_local = None
    else:
        cu = cu_seqlens.astype(jnp.int32)
        reset = cu[:-1] >= off        # the document starts on this slice or later
        cu_local = jnp.clip(cu - off, 0, T).astype(cu_seqlens.dtype)

    # Local run from [h0 | 0] (documents that start here or later) or [0 | I] (the one that
    # began on an earlier slice), values widened by K zero columns.
    r = reset[:, None, None, None]
    eye = jnp.broadcast_to(jnp.eye(K, dtype=acc), (N, H, K, K))
    h0 = jnp.concatenate([jnp.where(r, init, 0), jnp.where(r, 0, eye)], axis=-1)
    v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (K,), v.dtype)], axis=-1)
    o_aug, fin = run(v_aug, h0, cu_local)          # [B, T, H, V+K], [N, H, K, V+K]

    # Every device: the states entering each slice from the gathered maps.
    maps = lax.all_gather(fin, context_axis)       # [D, N, H, K, V+K]
    hi = lax.Precision.HIGHEST
    S = jnp.zeros((N, H, K, V), acc)
    entering = []
    for j in range(D):
        entering.append(S)
        S = maps[j, ..., :V] + jnp.einsum("nhkj,nhjv->nhkv", maps[j, ..., V:], S, precision=hi)
    E = lax.dynamic_index_in_dim(jnp.stack(entering), d, keepdims=False)   # [N, H, K, V]

    coef = o_aug[..., V:].astype(acc)              # [B, T, H, K]; 0 on reset documents
    if cu_seqlens is None:
        corr = jnp.einsum("bthk,bhkv->bthv", coef, E)
    else:  # only the document holding this slice's first token can have a nonzero coef
        c = jnp.clip(jnp.searchsorted(cu[1:], off, side="right"), 0, N - 1)
        corr = jnp.einsum("bthk,hkv->bthv", coef, E[c])
    o = (o_aug[..., :V].astype(acc) + corr).astype(o_aug.dtype)
    if not output_final_state:
        return o, None
    # The last slice's outgoing state, as a value replicated over the axis.
    own = fin[..., :V] + jnp.einsum("nhkj,nhjv->nhkv", fin[..., V:], E, precision=hi)
    final = lax.psum(jnp.where(d == D - 1, own, jnp.zeros_like(own)), context_axis)
    return o, final
