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
`lax.scan` over chunks that carries only (P, Z) at chunk boundaries. The math of one chunk and
head is `chunk_math` (shared with the Pallas kernels), vmapped here over [B, H].

Gradients: a custom_vjp (`_chunk_scan`) whose backward is written out by hand
(`chunk_math.chunk_vjp`): the forward keeps only the (P, Z) entering every chunk, and a reverse
`lax.scan` over chunks carries their cotangents, recomputing inside each chunk what the vjp
needs: memory O(T·(K+V) + T/C·|P|), never a memory per token. The coefficients (w, a, b, d)
are cheap functions of θ, η, α [B, T, H]; JAX differentiates them.

Packed sequences (cu_seqlens) use `common.chunk_layout`: every sequence starts on a chunk
boundary, a chunk that starts one loads its initial state, and the padding tokens are
identity steps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import common
from . import chunk_math


def batched(fn):
    """`fn` of one chunk and head (2-D arrays, chunk_math) over leading [B, H] axes."""
    return jax.vmap(jax.vmap(fn))


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


def chunk_inputs(layout, q, k, v, lr, momentum, decay, scale, acc):
    """The chunk-math inputs of every chunk: q (scaled), k, v [NC, B, H, C, D], the weights w0,
    w1 [NC, B, H, C, 1] and the transitions a, b, d [NC, B, H, 1, 1]."""
    def chunks(x):   # [B, T, H, ...] -> [NC, B, H, C, ...]
        xc = layout.to_chunks(x.astype(acc))
        return jnp.moveaxis(jnp.moveaxis(xc, 3, 2), 1, 0)

    B, T, H = lr.shape
    valid = chunks(jnp.ones((B, T, H), acc)) > 0          # padding tokens are identity steps
    lr_c = jnp.where(valid, chunks(lr), 0)
    (a, b, d), (cP, cZ) = chunk_coefficients(chunks(momentum), chunks(decay), valid)
    col = lambda x: x[..., None]
    return dict(q=chunks(q) * jnp.asarray(scale, acc), k=chunks(k), v=chunks(v),
                w0=col(-lr_c * cP), w1=col(-lr_c * cZ), a=col(col(a)), b=col(col(b)),
                d=col(col(d)))


_ARGS = ("q", "k", "v", "w0", "w1", "a", "b", "d")


def _entering(carry, init, reset, seq):
    """The (P, Z) a chunk starts from: the carry, or its sequence's initial state at a reset."""
    rows = lambda x: reset.reshape((-1,) + (1,) * (x.ndim - 1))
    return jax.tree.map(lambda n, o: jnp.where(rows(o), n[seq], o), init, carry)


def _forward(varlen: bool, keep: bool, xs, init, reset, seq):
    """(o [NC, B, H, C, V], the states after every chunk (varlen) or the last, and (keep) the
    (P, Z) entering every chunk)."""
    step = batched(chunk_math.update)
    read = batched(chunk_math.read)

    def body(carry, inp):
        x, r, s = inp
        params, mom = _entering(carry, init, r, s)
        new = step(params, mom, *(x[n] for n in _ARGS[1:]))
        return new, (read(params, x["q"]), new if varlen else None,
                     (params, mom) if keep else None)

    B = reset.shape[1]
    zeros = jax.tree.map(lambda p: jnp.zeros((B,) + p.shape[1:], p.dtype), init)
    carry, (o, ends, h) = lax.scan(body, zeros, (xs, reset, seq))
    return o, (ends if varlen else carry), h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_scan(varlen, xs, init, reset, seq):
    """The chunks in order from init = (params, mom) [N, H, ...]; reset, seq [NC, B]."""
    o, states, _ = _forward(varlen, False, xs, init, reset, seq)
    return o, states


def _chunk_scan_fwd(varlen, xs, init, reset, seq):
    o, states, h = _forward(varlen, True, xs, init, reset, seq)
    return (o, states), (xs, init, reset, seq, h)


def _chunk_scan_bwd(varlen, res, cts):
    xs, init, reset, seq, h = res
    do, dstates = cts
    vjp = batched(chunk_math.chunk_vjp)

    def body(carry, inp):
        dS, dinit = carry
        x, r, s, (params, mom), do_c, *dend = inp
        if varlen:   # the cotangent of this chunk's outgoing state as a final state
            dS = jax.tree.map(jnp.add, dS, dend[0])
        dparams, dmom, *dx = vjp(params, mom, *(x[n] for n in _ARGS), do_c, *dS)
        d_in = (dparams, dmom)
        rows = lambda t: r.reshape((-1,) + (1,) * (t.ndim - 1))
        dinit = jax.tree.map(lambda acc_, g: acc_.at[s].add(jnp.where(rows(g), g, 0)),
                             dinit, d_in)
        dS = jax.tree.map(lambda g: jnp.where(rows(g), 0, g), d_in)
        return (dS, dinit), dict(zip(_ARGS, dx))

    B = reset.shape[1]
    zeros = jax.tree.map(lambda p: jnp.zeros((B,) + p.shape[1:], p.dtype), init)
    carry = (zeros if varlen else dstates, jax.tree.map(jnp.zeros_like, init))
    dends = (dstates,) if varlen else ()
    (_, dinit), dxs = lax.scan(body, carry, (xs, reset, seq, h, do) + dends, reverse=True)
    return dxs, dinit, None, None


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)


def neural_memory_xla(q, k, v, lr, momentum, decay, *, depth, scale, initial_state,
                      cu_seqlens, chunk_size):
    """Chunked neural memory; arguments already validated (see reference.py for the rule).
    Returns (o [B,T,H,V] in q's dtype, (params, mom) of each sequence, tuples [N,H,...])."""
    del depth
    B, T = q.shape[:2]
    acc = common.acc_dtype(q)
    layout = common.chunk_layout(B, T, chunk_size, cu_seqlens)
    init = jax.tree.map(lambda x: x.astype(acc), initial_state)
    xs = chunk_inputs(layout, q, k, v, lr, momentum, decay, scale, acc)
    varlen = layout.last_chunk is not None
    o, states = _chunk_scan(varlen, xs, init, layout.reset.T, layout.seq.T)
    o = layout.from_chunks(jnp.moveaxis(jnp.moveaxis(o, 0, 1), 3, 2))   # [B, T, H, V]
    if varlen:   # the state after each sequence's last chunk (an empty one keeps its initial)
        states = jax.tree.map(lambda s, h0: layout.final_states(jnp.moveaxis(s, 0, 1), h0),
                              states, init)
    return o.astype(q.dtype), states
