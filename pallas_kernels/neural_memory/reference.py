"""The neural memory of Titans, token by token (plain and slow): the rule itself.

Per head the memory is a small network M with parameters P: depth 1 a matrix M [K, V]
(M(x) = Mᵀx), depth 2 an MLP (W1 [K, E], W2 [E, V], no biases, M(x) = W2ᵀ GELU(W1ᵀx) with the
exact erf GELU). Token t (θ = lr, η = momentum, α = decay, all [B, T, H], used as given):

    ℓ_t(P) = ½ ‖M_P(k_t) − v_t‖²
    Z_t = η_t Z_{t−1} − θ_t ∇ℓ_t(P_{t'})          (momentum, the "surprise")
    P_t = (1 − α_t) P_{t−1} + Z_t                  (forgetting, then the step)
    o_t = M_{P_{t'}}(scale · q_t)                  (the read)

t' is the start of t's chunk of `chunk_size` tokens, counted from the start of t's sequence:
every gradient of a chunk is taken at, and every read of a chunk uses, the memory the chunk
started with. chunk_size = 1 is the online rule (the gradient and the read use the memory
before the token's own update). The gradient here is `jax.grad` of the loss, written
independently of the hand-derived backward of the chunked form (xla.py).

Parameters and momenta are tuples of arrays: (M,) for depth 1, (W1, W2) for depth 2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import common


def memory_read(params: tuple, x: jax.Array) -> jax.Array:
    """M_P(x) for x [..., K] and params with matching leading dims ([..., K, V] or
    ([..., K, E], [..., E, V])) -> [..., V]. A matmul per token, batched over the leading dims."""
    if len(params) == 1:
        return jnp.einsum("...k,...kv->...v", x, params[0])
    W1, W2 = params
    h = jax.nn.gelu(jnp.einsum("...k,...ke->...e", x, W1), approximate=False)
    return jnp.einsum("...e,...ev->...v", h, W2)


def memory_loss(params: tuple, k: jax.Array, v: jax.Array) -> jax.Array:
    """½ ‖M_P(k) − v‖² of one head and token (params unbatched, k [K], v [V])."""
    e = memory_read(params, k) - v
    return 0.5 * jnp.sum(e * e)


def memory_grad(params: tuple, k: jax.Array, v: jax.Array) -> tuple:
    """∇_P ℓ for params [..., *] and k [..., K], v [..., V] with the same leading dims."""
    g = jax.grad(memory_loss)
    for _ in range(k.ndim - 1):
        g = jax.vmap(g)
    return g(params, k, v)


def memory_update(params: tuple, mom: tuple, grad: tuple, lr, momentum, decay):
    """Z = η Z − θ ∇, P = (1 − α) P + Z for per-head scalars lr/momentum/decay [...]."""
    b = lambda s, x: s.reshape(s.shape + (1,) * (x.ndim - s.ndim))
    mom = tuple(b(momentum, z) * z - b(lr, g) * g for z, g in zip(mom, grad))
    params = tuple(b(1 - decay, p) * p + z for p, z in zip(params, mom))
    return params, mom


def neural_memory_reference(q, k, v, lr, momentum, decay, *, depth, scale, initial_state,
                            cu_seqlens, chunk_size):
    """q, k [B,T,H,K], v [B,T,H,V], lr/momentum/decay [B,T,H]; initial_state = (params, mom),
    tuples of [N, H, ...] arrays (already in the accumulation dtype) -> (o [B,T,H,V] in q's
    dtype, (params, mom) after each sequence's last token)."""
    del depth  # the structure of the params says it
    B, T = q.shape[:2]
    acc = common.acc_dtype(q)
    layout = common.token_layout(B, T, cu_seqlens)
    N = layout.num_seqs
    init = jax.tree.map(lambda x: x.astype(acc), initial_state)
    xs = tuple(jnp.moveaxis(x.astype(acc), 1, 0) for x in (q, k, v, lr, momentum, decay))

    def body(carry, inp):
        start_params, params, mom, pos, final = carry
        (q_t, k_t, v_t, lr_t, eta_t, alpha_t), is_start, seq = inp
        row = jnp.minimum(seq, N - 1)

        def at(mask, new, old):   # per-row select over a [B, H, ...] tree
            return jax.tree.map(
                lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (o.ndim - 1)), n, o),
                new, old)

        loaded = jax.tree.map(lambda x: x[row], init)
        params, mom = at(is_start, loaded, (params, mom))
        pos = jnp.where(is_start, 0, pos)
        start_params = at(pos % chunk_size == 0, params, start_params)

        o_t = memory_read(start_params, scale * q_t)
        grad = memory_grad(start_params, k_t, v_t)
        params, mom = memory_update(params, mom, grad, lr_t, eta_t, alpha_t)

        valid = seq < N
        o_t = jnp.where(valid[:, None, None], o_t, 0)
        final = jax.tree.map(lambda f, x: f.at[jnp.where(valid, seq, N)].set(x, mode="drop"),
                             final, (params, mom))
        return (start_params, params, mom, pos + 1, final), o_t

    zeros = jax.tree.map(lambda x: jnp.zeros((B,) + x.shape[1:], acc), init[0])
    carry = (zeros, zeros, jax.tree.map(jnp.zeros_like, zeros), jnp.zeros(B, jnp.int32), init)
    (*_, final), o = jax.lax.scan(body, carry, (xs, layout.is_start.T, layout.seq.T))
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), final
