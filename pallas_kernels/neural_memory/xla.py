"""The neural memory in chunks, plain jnp (any backend).

Inside a chunk every gradient is taken at the chunk-start parameters P₀ (the rule's chunk
semantics, see reference.py), so the chunk's C gradients are batched matmuls, with the
backward of the memory network written out (no autodiff inside):

    depth 1:  e = K M − V;            ∇_M ℓ_s = k_s e_sᵀ
    depth 2:  h = K W1, a = GELU(h), e = a W2 − V, δ = (e W2ᵀ) ⊙ GELU′(h)
              ∇_W2 ℓ_s = a_s e_sᵀ,  ∇_W1 ℓ_s = k_s δ_sᵀ

Each token's gradient is rank one, so no per-token parameter copy is ever formed. Momentum
and forgetting are a linear recurrence on the pair (P, Z), token by token:

    (P_s, Z_s) = A_s (P_{s−1}, Z_{s−1}) + (1, 1) U_s,   A_s = [[1−α_s, η_s], [0, η_s]],
    U_s = −θ_s ∇ℓ_s(P₀)

so the chunk's end is (P_C, Z_C) = R (P₀, Z₀) + Σ_s R_s (1, 1) U_s with R_s = A_{C−1} ⋯ A_{s+1}
(R = R_{−1} the whole product): 2×2 upper-triangular scalars per token from an associative
scan, and the sums Σ_s c_s U_s are one matmul per parameter (Kᵀ (c ⊙ e), ...). The reads are
M_{P₀}(scale · q) for the whole chunk, one batched matmul. The sequential part is a
`lax.scan` over chunks that carries only (P, Z) at chunk boundaries.

Gradients: JAX autodiff through the chunk scan, with the chunk body under `jax.checkpoint`
(the backward recomputes inside each chunk and keeps only the boundary (P, Z) and the
inputs: memory O(T·(K+V) + T/C·|P|)). A hand-written custom_vjp is not written yet.

Packed sequences (cu_seqlens) use `common.chunk_layout`: every sequence starts on a chunk
boundary, a chunk that starts one loads its initial state, and the padding tokens are
identity steps.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import common
from .reference import memory_read


def _gelu_and_grad(h):
    """Exact GELU(h) = h Φ(h) and its derivative Φ(h) + h φ(h)."""
    cdf = 0.5 * (1 + lax.erf(h * (1 / math.sqrt(2))))
    pdf = jnp.exp(-0.5 * h * h) * (1 / math.sqrt(2 * math.pi))
    return h * cdf, cdf + h * pdf


def chunk_gradient_sums(params: tuple, k, v, weights):
    """Σ_s c_s ∇ℓ_s(P) for each row c of weights [..., n, C] (n weightings at once): params
    [..., *] (leading dims ...), k [..., C, K], v [..., C, V] -> tuple of [..., n, *]."""
    if len(params) == 1:
        e = jnp.einsum("...ck,...kv->...cv", k, params[0]) - v
        return (jnp.einsum("...nc,...ck,...cv->...nkv", weights, k, e),)
    W1, W2 = params
    h = jnp.einsum("...ck,...ke->...ce", k, W1)
    a, da_dh = _gelu_and_grad(h)
    e = jnp.einsum("...ce,...ev->...cv", a, W2) - v
    delta = jnp.einsum("...cv,...ev->...ce", e, W2) * da_dh
    gW1 = jnp.einsum("...nc,...ck,...ce->...nke", weights, k, delta)
    gW2 = jnp.einsum("...nc,...ce,...cv->...nev", weights, a, e)
    return gW1, gW2


def _compose(later, earlier):
    """[[a, b], [0, d]] products: later @ earlier, elementwise over the scanned axis."""
    a1, b1, d1 = later
    a0, b0, d0 = earlier
    return a1 * a0, a1 * b0 + b1 * d0, d1 * d0


def chunk_coefficients(momentum, decay, valid):
    """For η, α [..., C] and the mask of real tokens: the whole chunk's transition (a, b, d)
    [...] (P_C = a P₀ + b Z₀ + ..., Z_C = d Z₀ + ...) and, per token s, the weights (cP, cZ)
    [..., C] of U_s in P_C and Z_C. A padding token's transition is the identity (η = 1 alone
    would still add Z to P)."""
    A = (jnp.where(valid, 1 - decay, 1), jnp.where(valid, momentum, 0),
         jnp.where(valid, momentum, 1))
    # Inclusive suffix products S_s = A_{C−1} ⋯ A_s, then R_s = S_{s+1} (R_{C−1} = I). With
    # reverse=True the combine gets (the product of the later tokens, an earlier element).
    a, b, d = lax.associative_scan(_compose, A, reverse=True, axis=momentum.ndim - 1)
    one, zero = jnp.ones_like(a[..., :1]), jnp.zeros_like(a[..., :1])
    shift = lambda x, fill: jnp.concatenate([x[..., 1:], fill], axis=-1)
    Ra, Rb, Rd = shift(a, one), shift(b, zero), shift(d, one)
    return (a[..., 0], b[..., 0], d[..., 0]), (Ra + Rb, Rd)


def neural_memory_xla(q, k, v, lr, momentum, decay, *, depth, scale, initial_state,
                      cu_seqlens, chunk_size):
    """Chunked neural memory; arguments already validated (see reference.py for the rule).
    Returns (o [B,T,H,V] in q's dtype, (params, mom) of each sequence, tuples [N,H,...])."""
    del depth
    B, T, H, K = q.shape
    acc = common.acc_dtype(q)
    layout = common.chunk_layout(B, T, chunk_size, cu_seqlens)
    NC, N = layout.num_chunks, layout.num_seqs
    init_params, init_mom = jax.tree.map(lambda x: x.astype(acc), initial_state)

    def chunks(x):   # [B, T, H, ...] -> [NC, B, H, C, ...]
        xc = layout.to_chunks(x.astype(acc))
        return jnp.moveaxis(jnp.moveaxis(xc, 3, 2), 1, 0)

    valid = chunks(jnp.ones((B, T, H), acc)) > 0          # padding tokens are identity steps
    lr_c = jnp.where(valid, chunks(lr), 0)
    (a, b, d), (cP, cZ) = chunk_coefficients(chunks(momentum), chunks(decay), valid)
    weights = -jnp.stack([lr_c * cP, lr_c * cZ], axis=-2)       # [NC, B, H, 2, C]
    xs = dict(q=chunks(q) * jnp.asarray(scale, acc), k=chunks(k), v=chunks(v), w=weights,
              a=a, b=b, d=d, reset=layout.reset.T, seq=layout.seq.T)

    def rows(mask, x):   # [B] -> broadcastable against x [B, ...]
        return mask.reshape((-1,) + (1,) * (x.ndim - 1))

    def body(carry, x):
        params, mom = carry
        loaded = jax.tree.map(lambda p: p[x["seq"]], (init_params, init_mom))
        params, mom = jax.tree.map(lambda n, o: jnp.where(rows(x["reset"], o), n, o),
                                   loaded, (params, mom))
        o = memory_read(tuple(p[:, :, None] for p in params), x["q"])
        sums = chunk_gradient_sums(params, x["k"], x["v"], x["w"])
        coef = lambda s, p: s.reshape(s.shape + (1,) * (p.ndim - s.ndim))
        new_params = tuple(coef(x["a"], p) * p + coef(x["b"], z) * z + g[:, :, 0]
                           for p, z, g in zip(params, mom, sums))
        new_mom = tuple(coef(x["d"], z) * z + g[:, :, 1] for z, g in zip(mom, sums))
        ends = (new_params, new_mom) if layout.last_chunk is not None else None
        return (new_params, new_mom), (o, ends)

    zeros = jax.tree.map(lambda p: jnp.zeros((B,) + p.shape[1:], acc), init_params)
    carry = (zeros, jax.tree.map(jnp.zeros_like, zeros))
    carry, (o, ends) = lax.scan(jax.checkpoint(body), carry, xs)
    o = layout.from_chunks(jnp.moveaxis(jnp.moveaxis(o, 0, 1), 3, 2))   # [B, T, H, V]
    if ends is None:
        final = carry
    else:   # the state after each sequence's last chunk (an empty one keeps its initial)
        final = jax.tree.map(
            lambda s, h0: layout.final_states(jnp.moveaxis(s, 0, 1), h0),
            ends, (init_params, init_mom))
    return o.astype(q.dtype), final
