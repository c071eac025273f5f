"""The chunk-scan scaffolding shared by the chunked (XLA) forms of the recurrent ops.

Both linear attention and the gated delta rule are, chunk by chunk, *affine* in the state that
enters the chunk. An op describes one chunk by an `intra` function, batched over all chunks:

    S_out = M · S_in + B          (state after the chunk)
    o     = Qeff · S_in + O       (the chunk's outputs)

with M [K, K] (or its diagonal [K], or a scalar []), B [K, V], Qeff [C, K], O [C, V]. Everything
inside a chunk (masked matmuls, decays, the WY/UT solve) lives in `intra` and runs batched over
all chunks at once; the only sequential part is the state pass `S_out = M S_in + B`, a
`lax.scan` over chunks.

The backward (`jax.custom_vjp`) keeps the op's inputs and the state entering each chunk, nothing
per token: it recomputes `intra`, runs the state pass in reverse to get dS at every chunk
boundary, and pulls the cotangents of (M, B, Qeff, O) back through ONE batched vjp of `intra`.
Memory therefore grows as O(T·(K+V) + T/C·K·V), never O(T·K·V).

Internal layout is chunk-major: [NC, B, H, C, D] for token quantities, [NC, B, H, K, V] for states.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import ChunkLayout, acc_dtype, chunk_layout

Intra = Callable[[Mapping[str, jax.Array]], tuple]


# ----------------------------------------------------------------------------- small helpers
def masked_decay(G: jax.Array) -> jax.Array:
    """exp(G_i - G_j) for i >= j and 0 above the diagonal, from within-chunk cumsums G [..., C].

    The exponent is masked BEFORE exp, so a positive difference is never exponentiated."""
    C = G.shape[-1]
    causal = jnp.tril(jnp.ones((C, C), bool))
    diff = G[..., :, None] - G[..., None, :]
    return jnp.exp(jnp.where(causal, diff, -jnp.inf))


def _apply(M: jax.Array, S: jax.Array) -> jax.Array:
    """M · S for a full [.., K, K], diagonal [.., K] or scalar [..] transition M; S is [.., K, V]."""
    if M.ndim == S.ndim:
        return jnp.einsum("...kj,...jv->...kv", M, S)
    if M.ndim == S.ndim - 1:
        return M[..., :, None] * S
    return M[..., None, None] * S


def _apply_t(M: jax.Array, dS: jax.Array) -> jax.Array:
    """Mᵀ · dS, the transpose of `_apply`."""
    if M.ndim == dS.ndim:
        return jnp.einsum("...jk,...jv->...kv", M, dS)
    return _apply(M, dS)


def _outer_like(M: jax.Array, dS: jax.Array, S: jax.Array) -> jax.Array:
    """Cotangent of M in `M · S` given the output cotangent dS, in M's own (full/diag/scalar) form."""
    if M.ndim == S.ndim:
        return jnp.einsum("...kv,...jv->...kj", dS, S)
    if M.ndim == S.ndim - 1:
        return jnp.sum(dS * S, axis=-1)
    return jnp.sum(dS * S, axis=(-2, -1))


# ----------------------------------------------------------------------------- the chunk scan
def _state_pass(M, B, h_init, reset):
    """S_in[c] = h_init[c] if reset[c] else S_out[c-1];  S_out[c] = M[c] S_in[c] + B[c]."""
    def step(S, xs):
        M_c, B_c, h_c, r_c = xs
        S_in = jnp.where(r_c[:, None, None, None], h_c, S)
        S_out = _apply(M_c, S_in) + B_c
        return S_out, (S_in, S_out)

    _, (S_in, S_out) = lax.scan(step, jnp.zeros_like(h_init[0]), (M, B, h_init, reset))
    return S_in, S_out


def _read_out(Qeff, O, S_in):
    return O + jnp.einsum("...ck,...kv->...cv", Qeff, S_in)


def _chunk_scan_impl(intra, inputs, h_init, reset):
    M, B, Qeff, O = intra(inputs)
    S_in, S_out = _state_pass(M, B, h_init, reset)
    return _read_out(Qeff, O, S_in), S_out, S_in


def _chunk_scan_fwd(intra, inputs, h_init, reset):
    o, S_out, S_in = _chunk_scan_impl(intra, inputs, h_init, reset)
    return (o, S_out), (inputs, reset, S_in)


def _chunk_scan_bwd(intra, res, cts):
    inputs, reset, S_in = res
    do, dS_after = cts
    (M, _, Qeff, _), intra_vjp = jax.vjp(intra, inputs)

    def step(dS_next, xs):  # runs from the last chunk to the first
        M_c, Qeff_c, do_c, dA_c, r_c = xs
        dS_out = dA_c + dS_next
        dS_in = _apply_t(M_c, dS_out) + jnp.einsum("...ck,...cv->...kv", Qeff_c, do_c)
        r = r_c[:, None, None, None]
        return jnp.where(r, 0, dS_in), (dS_out, jnp.where(r, dS_in, 0))

    _, (dS_out, dh_init) = lax.scan(step, jnp.zeros_like(S_in[0]),
                                    (M, Qeff, do, dS_after, reset), reverse=True)
    cot = (_outer_like(M, dS_out, S_in), dS_out,
           jnp.einsum("...cv,...kv->...ck", do, S_in), do)
    (dinputs,) = intra_vjp(cot)
    return dinputs, dh_init, None


def _chunk_scan_primal(intra, inputs, h_init, reset):
    o, S_out, _ = _chunk_scan_impl(intra, inputs, h_init, reset)
    return o, S_out


_chunk_scan = jax.custom_vjp(_chunk_scan_primal, nondiff_argnums=(0,))
_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)


# ----------------------------------------------------------------------------- token <-> chunks
def to_chunk_major(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """[B, T, H, ...] -> [NC, B, H, C, ...] (padding and sequence moves from the layout)."""
    xc = layout.to_chunks(x)  # [B, NC, C, H, ...]
    return jnp.transpose(xc, (1, 0, 3, 2) + tuple(range(4, xc.ndim)))


def from_chunk_major(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """[NC, B, H, C, ...] -> [B, T, H, ...], the inverse of `to_chunk_major` on real tokens."""
    return layout.from_chunks(jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim))))


def run_chunked(intra: Intra, tokens: Mapping[str, Optional[jax.Array]], *, q: jax.Array,
                scale: float, value_dim: int, initial_state: Optional[jax.Array], cu_seqlens,
                chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Run a chunked recurrence given its per-chunk `intra` function.

    tokens: named [B, T, H, ...] inputs (None entries are left out); they are cast to the
    accumulation dtype and laid out chunk-major before `intra` sees them, and tokens["q"] is
    multiplied by `scale`. Returns
    (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] in the accumulation dtype).
    """
    B, T, H, K = q.shape
    acc = acc_dtype(q)
    layout = chunk_layout(B, T, chunk_size, cu_seqlens)
    inputs = {name: to_chunk_major(x.astype(acc), layout)
              for name, x in tokens.items() if x is not None}
    inputs["q"] = inputs["q"] * jnp.asarray(scale, acc)
    h_init = layout.initial_states(initial_state, B, (H, K, value_dim), acc)  # [B, NC, H, K, V]
    o, S_out = _chunk_scan(intra, inputs, jnp.moveaxis(h_init, 1, 0), layout.reset.T)
    final = layout.final_states(jnp.moveaxis(S_out, 0, 1), initial_state)
    return from_chunk_major(o, layout).astype(q.dtype), final.astype(acc)
