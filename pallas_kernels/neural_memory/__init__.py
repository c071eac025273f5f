"""Titans' neural long-term memory (Behrouz et al. 2025): `neural_memory` over a sequence,
`neural_memory_step` for decoding, `neural_memory_read` for reads of a given memory without
a write (Titans MAC's M*(q)).

The memory of each head is a small network trained while it reads, by gradient descent with
momentum and forgetting on an associative loss (θ = lr, η = momentum, α = decay, [B, T, H],
used as given; the layer makes them data-dependent):

    ℓ_t(M) = ½ ‖M(k_t) − v_t‖²
    Z_t = η_t Z_{t−1} − θ_t ∇ℓ_t(M_{t'})        (momentum, the "surprise")
    M_t = (1 − α_t) M_{t−1} + Z_t
    o_t = M_{t'}(scale · q_t)

- depth 1: M is a matrix [K, V], M(x) = Mᵀx;
- depth 2: an MLP W1 [K, E], W2 [E, V] without biases, M(x) = W2ᵀ GELU(W1ᵀx), exact (erf) GELU.

Chunk semantics: t' is the first token of t's chunk of `chunk_size` tokens (chunks counted
from each sequence's start). Within a chunk every gradient is taken at, and every read uses,
the memory the chunk started with (the paper's mini-batch gradient descent, Eq. 16–17, with
the read at the same memory: a token never reads its own write); momentum and forgetting
still run per token. chunk_size = 1 is the exact online rule, reading the memory before the
token's own update. With depth 1, α = η = 0 and chunk_size = 1 this is DeltaNet with β = θ,
except that DeltaNet reads S_t (after its update) where this reads M_{t−1}. Unlike the other
recurrent ops, `chunk_size` is therefore part of the function, not only a speed setting.

State: `initial_state = (memory, momentum)`, memory M [N, H, K, V] (depth 1) or a pair
(W1 [N, H, K, E], W2 [N, H, E, V]) (depth 2), momentum of the same structure or None
(zeros). Depth 1 may also take initial_state=None (zero memory); depth 2 needs one, since a
zero MLP has zero gradients and never learns (the layer passes its learned initial memory).
The final state has the same structure: (memory, momentum) after each sequence's last token.

Inputs and bad values: as for every recurrent op, see `pallas_kernels.common.INPUT_CONTRACT`
(except that chunk_size may be any positive int). impl "xla" (chunked; "auto" everywhere),
"pallas" (the kernels; interpret mode on CPU) and "reference" (token by token). The chunked
impls have a hand-written custom_vjp that recomputes inside each chunk from the saved
chunk-boundary (memory, momentum): memory O(T·(K+V) + T/chunk·|memory|), never a memory per
token; the reference is differentiated by JAX.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from .. import common
from . import chunk_math
from .reference import memory_read, memory_update
from .xla import batched

_OPTIONAL = ("cu_seqlens",)
# impl="auto" on every backend (not common.AUTO_IMPL): the kernels have not been timed on a GPU
# or TPU yet (`eval.bench_ops` nm1 / nm2), and a program holds a whole (P, Z) — at depth 2,
# K = 128 and E = 4K that is 1 MiB of float32, beyond a Triton program's registers.
AUTO_IMPL = "xla"


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or depth not in (1, 2):
        raise ValueError(f"`depth` must be 1 (a matrix memory) or 2 (an MLP memory), "
                         f"got {depth!r}")
    return int(depth)


def _memory_leaves(name: str, memory, depth: int, N: int, H: int, K: int, V: int,
                   hidden: Optional[int] = None) -> tuple:
    """The memory (or momentum) of one state as a checked tuple of arrays: (M,) or (W1, W2)."""
    if depth == 1:
        if isinstance(memory, (tuple, list)):
            raise ValueError(f"`{name}` of a depth-1 memory must be one array [N, H, K, V] = "
                             f"{(N, H, K, V)}, got a {type(memory).__name__} of "
                             f"{len(memory)}")
        M = common.as_input(name, memory)
        common.check_array(name, M, (N, H, K, V), "[N, H, K, V], N = number of sequences")
        return (M,)
    if not isinstance(memory, (tuple, list)) or len(memory) != 2:
        raise ValueError(f"`{name}` of a depth-2 memory must be a pair (W1 [N, H, K, E], "
                         f"W2 [N, H, E, V]), got {common._describe(memory)}")
    W1 = common.as_input(f"{name}[0] (W1)", memory[0])
    W2 = common.as_input(f"{name}[1] (W2)", memory[1])
    shape = common.check_rank(f"{name}[0] (W1)", W1, 4)
    E = shape[-1] if hidden is None else hidden
    if E < 1:
        raise ValueError(f"`{name}[0] (W1)` must have a hidden width E >= 1, got {shape}")
    common.check_array(f"{name}[0] (W1)", W1, (N, H, K, E), "[N, H, K, E]")
    common.check_array(f"{name}[1] (W2)", W2, (N, H, E, V), "[N, H, E, V]")
    return W1, W2


def _check_state(name: str, state, depth: int, N: int, H: int, K: int, V: int,
                 allow_none: bool) -> Optional[tuple]:
    """(params, mom) tuples of arrays, mom None for zeros; None if state is None and allowed."""
    if state is None:
        if allow_none:
            return None
        why = (" (a zero MLP memory has zero gradients and never learns: pass the learned "
               "initial memory)" if depth == 2 else "")
        raise ValueError(f"`{name}` is required{why}, got None")
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"`{name}` must be a pair (memory, momentum), got "
                         f"{common._describe(state)}")
    params = _memory_leaves(f"{name}[0]", state[0], depth, N, H, K, V)
    E = params[0].shape[-1] if depth == 2 else None
    mom = (None if state[1] is None else
           _memory_leaves(f"{name}[1]", state[1], depth, N, H, K, V, hidden=E))
    return params, mom


def _as_state(checked, acc, zeros_shape) -> tuple:
    """Validated (params, mom) -> JAX arrays in acc; mom zeros where None; None -> zeros."""
    if checked is None:
        M = jnp.zeros(zeros_shape, acc)
        return (M,), (jnp.zeros_like(M),)
    params, mom = checked
    params = tuple(jnp.asarray(p).astype(acc) for p in params)
    mom = (tuple(jnp.zeros_like(p) for p in params) if mom is None
           else tuple(jnp.asarray(z).astype(acc) for z in mom))
    return params, mom


def _public(state: tuple):
    """(params, mom) tuples -> (memory, momentum) in the public structure."""
    params, mom = state
    unwrap = lambda t: t[0] if len(t) == 1 else tuple(t)
    return unwrap(params), unwrap(mom)


def neural_memory(q, k, v, lr, momentum, decay, *, depth, chunk_size, scale=1.0,
                  initial_state=None, output_final_state=False, impl="auto", cu_seqlens=None):
    """o [B,T,H,V] (q's dtype), and the final (memory, momentum) (float32, float64 for
    float64 q) if output_final_state, else None.

    q, k [B,T,H,K]; v [B,T,H,V]; lr, momentum, decay [B,T,H]; depth 1 or 2; chunk_size a
    positive int (it sets the semantics, see the module docstring); scale a number (None:
    K**-0.5); initial_state (memory, momentum) with N = B, or N packed sequences given by
    cu_seqlens int [N+1] in a B == 1 batch (every sequence restarts from its own initial
    memory and momentum; tokens past cu[N] get o = 0). impl: "auto" (xla, see AUTO_IMPL) |
    "reference" | "xla" | "pallas".
    """
    q, k, v, lr, momentum, decay, cu_seqlens = common.as_inputs(
        _OPTIONAL, q=q, k=k, v=v, lr=lr, momentum=momentum, decay=decay, cu_seqlens=cu_seqlens)
    B, T, H, K, V = common.check_qkv(q, k, v)
    for name, x in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        common.check_array(name, x, (B, T, H), "[B, T, H]")
    depth = _check_depth(depth)
    chunk_size = common.check_positive_int("chunk_size", chunk_size)
    scale = common.check_scale(scale, K)
    N = common.check_cu_seqlens(cu_seqlens, B, T) or B
    checked = _check_state("initial_state", initial_state, depth, N, H, K, V,
                           allow_none=depth == 1)
    output_final_state = common.check_flag("output_final_state", output_final_state)
    fn = common.select_impl(__name__, "neural_memory", AUTO_IMPL if impl == "auto" else impl,
                            chunk_size)
    q, k, v, lr, momentum, decay, cu_seqlens = common.to_jax(
        q, k, v, lr, momentum, decay, cu_seqlens)
    acc = common.acc_dtype(q)
    state = _as_state(checked, acc, (N, H, K, V))
    if B * T == 0:
        o = jnp.zeros((B, T, H, V), q.dtype)
    else:
        # A chunk longer than the input is the same function as one of T tokens (every
        # sequence then lies in its first chunk), without the padding.
        o, state = fn(q, k, v, lr, momentum, decay, depth=depth, scale=scale,
                      initial_state=state, cu_seqlens=cu_seqlens, chunk_size=min(chunk_size, T))
    return o, (_public(state) if output_final_state else None)


def neural_memory_step(q, k, v, lr, momentum, decay, *, depth, scale=1.0, state,
                       chunk_memory=None):
    """One decoding token: q, k [B,H,K], v [B,H,V], lr, momentum, decay [B,H], state =
    (memory, momentum) [B,H,...] -> (o [B,H,V] in q's dtype, new (memory, momentum) in float32).

    The read and the gradient use `chunk_memory` (the memory the current chunk started with,
    same structure as the memory), or the state's memory when it is None: chunk_size = 1
    decoding passes None; with chunk_size C the caller keeps the memory of the last chunk
    boundary and replaces it by the new memory after every C-th token of the sequence, which
    reproduces `neural_memory(..., chunk_size=C)` token by token.
    """
    q, k, v, lr, momentum, decay = common.as_inputs(
        (), q=q, k=k, v=v, lr=lr, momentum=momentum, decay=decay)
    B, H, K, V = common.check_qkv(q, k, v, step=True)
    for name, x in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        common.check_array(name, x, (B, H), "[B, H]")
    depth = _check_depth(depth)
    scale = common.check_scale(scale, K)
    checked = _check_state("state", state, depth, B, H, K, V, allow_none=False)
    chunk = (None if chunk_memory is None else
             _memory_leaves("chunk_memory", chunk_memory, depth, B, H, K, V,
                            hidden=checked[0][0].shape[-1] if depth == 2 else None))
    q, k, v, lr, momentum, decay = common.to_jax(q, k, v, lr, momentum, decay)
    acc = common.acc_dtype(q)
    params, mom = _as_state(checked, acc, None)
    at = params if chunk is None else tuple(jnp.asarray(p).astype(acc) for p in chunk)
    out_dtype = q.dtype
    q, k, v, lr, momentum, decay = common.cast(acc, q, k, v, lr, momentum, decay)
    o = memory_read(at, scale * q)
    # The gradient as the chunked form writes it out (a chunk of one token, weight 1).
    one = jnp.ones(k.shape[:-1] + (1, 1), acc)
    grad, _ = batched(chunk_math.gradient_sums)(at, k[..., None, :], v[..., None, :], one,
                                                one)
    params, mom = memory_update(params, mom, grad, lr, momentum, decay)
    return o.astype(out_dtype), _public((params, mom))


def neural_memory_read(q, memory, *, scale=1.0):
    """M(scale · q) of a given memory, no write: q [B, T, H, K], memory [B, H, K, V] (depth 1)
    or (W1 [B, H, K, E], W2 [B, H, E, V]) (depth 2) -> [B, T, H, V] in q's dtype (computed in
    float32, float64 for float64 q). The read of `neural_memory` and `neural_memory_step`."""
    q = common.as_input("q", q)
    B, T, H, K = common.check_rank("q", q, 4)
    depth = 2 if isinstance(memory, (tuple, list)) else 1
    V = 1   # a depth-2 memory that is not a pair fails in _memory_leaves, which says so
    if depth == 1 or len(memory) == 2:
        name = "memory" if depth == 1 else "memory[1] (W2)"
        V = common.check_rank(name, common.as_input(name, memory if depth == 1 else memory[1]),
                              4)[-1]
    leaves = _memory_leaves("memory", memory, depth, B, H, K, V)
    scale = common.check_scale(scale, K)
    q = common.to_jax(q)[0]
    acc = common.acc_dtype(q)
    params = tuple(jnp.asarray(p).astype(acc)[:, None] for p in leaves)   # [B, 1, H, ...]
    return memory_read(params, scale * q.astype(acc)).astype(q.dtype)


__all__ = ["neural_memory", "neural_memory_read", "neural_memory_step"]
