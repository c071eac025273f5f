"""The chunk-scan scaffolding shared by the chunked (XLA) forms of the recurrent ops.

Both linear attention and the gated delta rule are, chunk by chunk, *affine* in the state that
enters the chunk. An op describes one chunk by an `intra` function:

    S_out = M · S_in + B          (state after the chunk)
    o     = Qeff · S_in + O       (the chunk's outputs)

with M [K, K] (or its diagonal [K], or a scalar []), B [K, V], Qeff [C, K], O [C, V]. Everything
inside a chunk (masked matmuls, decays, the WY/UT solve) lives in `intra` and runs batched over
chunks; the only sequential part is the state pass `S_out = M S_in + B`, a `lax.scan` over
chunks.

The backward (`jax.custom_vjp`) keeps the op's inputs, the state entering each chunk and (M,
Qeff), nothing per token: it runs the state pass in reverse to get dS at every chunk boundary,
then pulls the cotangents of (M, B, Qeff, O) back through a batched vjp of `intra`, which
recomputes the inside of each chunk. Memory therefore grows as O(T·(K+V) + T/C·K·V), never
O(T·K·V).

`intra` is written for ONE chunk ([C, D] token quantities) and runs vmapped over groups of
`GROUP` chunks (a flat batch [NC·B·H, C, D]: one batch dimension is what XLA's CPU matmuls
like), in a scan over groups so that the working memory of the backward is bounded; the state
pass runs over [NC, B·H, K, V].
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ..common import ChunkLayout, acc_dtype, chunk_layout, fitted_chunk, match_vma

Intra = Callable[[Mapping[str, jax.Array]], tuple]

GROUP = 32  # default chunks (of all heads) per batched call of `intra`: bounds working memory


# ----------------------------------------------------------------------------- small helpers
def masked_decay(G: jax.Array) -> jax.Array:
    """exp(G_i - G_j) for i >= j and 0 above the diagonal, from within-chunk cumsums G [..., C].

    The exponent is masked BEFORE exp (to 0, and the result zeroed after), so a positive
    difference is never exponentiated; a multiplied mask fuses with the exp, a select does not."""
    C = G.shape[-1]
    causal = jnp.tril(jnp.ones((C, C), G.dtype))
    return jnp.exp((G[..., :, None] - G[..., None, :]) * causal) * causal


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


# ----------------------------------------------------------------------------- per-key decays
# With per-key decays (GLA's gk, KDA's), exp(A_i)·exp(−A_j) would overflow (gk = −20 per
# token gives A ≈ −1280 over a chunk), so the chunk is cut into sub-chunks of `SUB` tokens:
# a query block against earlier blocks uses the block's first position r as reference,
# q_i e^{A_i − r} · k_j e^{r − A_j} (both factors ≤ 1), and the diagonal blocks use the
# masked elementwise form Σ_k q_ik k_jk e^{A_ik − A_jk}.
SUB = 16  # sub-chunk length for per-key decays
GROUP_GK = 16  # chunks per batched call with per-key decays: XLA keeps [SUB, SUB, K] products


def _decay(A: jax.Array) -> tuple:
    """(causal mask [s, s], E [..., s, s, K] = exp(A_ik − A_jk) for i ≥ j, 1 above)."""
    s = A.shape[-2]
    causal = jnp.tril(jnp.ones((s, s), A.dtype))
    return causal, jnp.exp((A[..., :, None, :] - A[..., None, :, :]) * causal[:, :, None])


@jax.custom_vjp
def _diag_scores(q: jax.Array, k: jax.Array, A: jax.Array) -> jax.Array:
    """D_ij = Σ_k q_ik k_jk exp(A_ik − A_jk) for i ≥ j (0 above), q, k, A: [..., s, K].

    The mask multiplies the exponent (masked entries are exp(0), zeroed afterwards): XLA fuses
    the exp into the product and the reduction, so no [s, s, K] array is stored, here or in the
    hand-written backward (autodiff would keep several)."""
    causal, E = _decay(A)
    return causal * jnp.sum(q[..., :, None, :] * k[..., None, :, :] * E, axis=-1)


def _diag_scores_fwd(q, k, A):
    return _diag_scores(q, k, A), (q, k, A)


def _diag_scores_bwd(res, dD):
    q, k, A = res
    causal, E = _decay(A)
    G = (dD * causal)[..., None]                                 # [.., s, s, 1]
    dq = jnp.sum(G * k[..., None, :, :] * E, axis=-2)
    dk = jnp.sum(G * q[..., :, None, :] * E, axis=-3)
    W = G * q[..., :, None, :] * k[..., None, :, :] * E          # d D_ij / d A_ik, per k
    dA = jnp.sum(W, axis=-2) - jnp.sum(W, axis=-3)
    return dq, dk, dA


_diag_scores.defvjp(_diag_scores_fwd, _diag_scores_bwd)


def per_key_scores(q: jax.Array, k: jax.Array, A: jax.Array, sub: int) -> jax.Array:
    """P_ij = Σ_k q_ik k_jk exp(A_ik − A_jk) for i ≥ j, 0 above; q, k, A: [..., C, K]."""
    *lead, C, K = q.shape
    s = min(sub, C)
    n = C // s
    qb = q.reshape(*lead, n, s, K)
    Ab = A.reshape(*lead, n, s, K)
    r = Ab[..., :, :1, :]                                       # [.., n, 1, K] block references
    # Masks multiply the exponent (0 where masked: exp(0) = 1, zeroed afterwards) rather than
    # selecting -inf: XLA fuses the product into the exp and the reduction, not the select.
    # Earlier blocks: q_i e^{A_i − r_a} · k_j e^{r_a − A_j}, j before block a (exponents ≤ 0).
    before = (jnp.arange(C)[None, :] < (jnp.arange(n) * s)[:, None]).astype(q.dtype)[:, :, None]
    k_ref = k[..., None, :, :] * jnp.exp((r - A[..., None, :, :]) * before) * before
    off = jnp.einsum("...aik,...ajk->...aij", qb * jnp.exp(Ab - r), k_ref)  # [.., n, s, C]
    # Diagonal blocks: the masked elementwise form, one fused multiply-exp-reduce.
    diag = _diag_scores(qb, k.reshape(*lead, n, s, K), Ab)
    eye = jnp.eye(n, dtype=q.dtype)
    off = off.reshape(*lead, n, s, n, s) + diag[..., :, :, None, :] * eye[:, None, :, None]
    return off.reshape(*lead, C, C)



# ----------------------------------------------------------------------------- the chunk scan
# States are rows of B·H (batch × head) matrices. Chunk c of row r loads row load[c, r] of the
# initial states h0 [N·H, K, V] when reset[c, r], and its outgoing state becomes row
# store[c, r] of the final states when it ends a sequence (store == N·H: it does not).

def _map_chunks(f, xs, group):
    """f applied to every chunk of the flat batch [NC*BH, ...], `group` chunks at a time.

    `f` is written for one chunk; it runs vmapped over a group (one batch dimension for the
    matmuls) inside a scan over groups, so the working memory of `intra` and of its vjp is
    bounded by the group, not by T."""
    n = jax.tree.leaves(xs)[0].shape[0]
    return lax.map(f, xs, batch_size=min(group, n))


def _rows(x, NC):
    """[NC*BH, ...] -> [NC, BH, ...]"""
    return x.reshape((NC, -1) + x.shape[1:])


def _chunk_scan_impl(intra, group, inputs, h0, reset, load, store):
    NC = reset.shape[0]
    M, B, Qeff, O = _map_chunks(intra, inputs, group)

    def step(carry, xs):
        S, final = carry
        M_c, B_c, r_c, load_c, store_c = xs
        S_in = jnp.where(r_c[:, None, None], h0[load_c], S)
        S_out = _apply(M_c, S_in) + B_c
        return (S_out, final.at[store_c].set(S_out, mode="drop")), S_in

    init = (jnp.zeros(reset.shape[1:] + h0.shape[1:], h0.dtype), h0)
    init = match_vma(init, M, B, h0, reset, load, store)  # inside shard_map: see match_vma
    (_, final), S_in = lax.scan(step, init, (_rows(M, NC), _rows(B, NC), reset, load, store))
    S_in = S_in.reshape((-1,) + S_in.shape[2:])
    o = O + jnp.einsum("nck,nkv->ncv", Qeff, S_in)
    return o, final, (inputs, h0, reset, load, store, S_in, M, Qeff)


def _chunk_scan(intra, group, inputs, h0, reset, load, store):
    """(o [NC*BH, C, V], final states [N*H, K, V]) for chunk inputs [NC*BH, C, ...]."""
    o, final, _ = _chunk_scan_impl(intra, group, inputs, h0, reset, load, store)
    return o, final


def _chunk_scan_fwd(intra, group, inputs, h0, reset, load, store):
    o, final, res = _chunk_scan_impl(intra, group, inputs, h0, reset, load, store)
    return (o, final), res


def _chunk_scan_bwd(intra, group, res, cts):
    inputs, h0, reset, load, store, S_in, M, Qeff = res
    do, dfinal = cts
    NC, NH = reset.shape[0], h0.shape[0]
    dS_o = _rows(jnp.einsum("nck,ncv->nkv", Qeff, do), NC)  # the read-out's share of dS_in

    def step(carry, xs):  # runs from the last chunk to the first
        dS_next, dh0 = carry
        M_c, dSo_c, r_c, load_c, store_c = xs
        dS_out = dS_next + dfinal.at[store_c].get(mode="fill", fill_value=0)
        dS_in = _apply_t(M_c, dS_out) + dSo_c
        r = r_c[:, None, None]
        dh0 = dh0.at[jnp.where(r_c, load_c, NH)].add(dS_in, mode="drop")
        return (jnp.where(r, 0, dS_in), dh0), dS_out

    # Final states never overwritten (empty sequences) are the initial states themselves.
    kept = jnp.ones(NH, bool).at[store.ravel()].set(False, mode="drop")
    init = (jnp.zeros_like(dS_o[0]), jnp.where(kept[:, None, None], dfinal, 0))
    init = match_vma(init, M, dS_o, dfinal, reset, load, store)
    (_, dh0), dS_out = lax.scan(step, init, (_rows(M, NC), dS_o, reset, load, store),
                                reverse=True)

    def chunk_vjp(xs):
        x, S_in_c, dS_out_c, do_c = xs
        # A constant output (M of ungated linear attention) varies with its cotangents
        # inside shard_map (see match_vma).
        (M_c, _, _, _), vjp = jax.vjp(lambda x: match_vma(intra(x), x, S_in_c, do_c), x)
        return vjp((_outer_like(M_c, dS_out_c, S_in_c), dS_out_c,
                    jnp.einsum("cv,kv->ck", do_c, S_in_c), do_c))[0]

    dinputs = _map_chunks(chunk_vjp, (inputs, S_in, dS_out.reshape(S_in.shape), do), group)
    return dinputs, dh0, None, None, None


_chunk_scan = jax.custom_vjp(_chunk_scan, nondiff_argnums=(0, 1))
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
                chunk_size: int, group: int = GROUP) -> tuple[jax.Array, jax.Array]:
    """Run a chunked recurrence given its per-chunk `intra` function.

    tokens: named [B, T, H, ...] inputs (None entries are left out); they are cast to the
    accumulation dtype and laid out chunk-major before `intra` sees them, and tokens["q"] is
    multiplied by `scale`. `group`: chunks (of all heads) per batched call of `intra`. Returns
    (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] in the accumulation dtype).
    """
    B, T, H, K = q.shape
    acc = acc_dtype(q)
    layout = chunk_layout(B, T, fitted_chunk(chunk_size, T), cu_seqlens)
    NC, N = layout.num_chunks, layout.num_seqs
    inputs = {name: to_chunk_major(x.astype(acc), layout)
              for name, x in tokens.items() if x is not None}
    inputs["q"] = inputs["q"] * jnp.asarray(scale, acc)
    inputs = {name: x.reshape((NC * B * H,) + x.shape[3:]) for name, x in inputs.items()}

    # Which state rows (sequence × head) each chunk loads and stores.
    heads = jnp.arange(H, dtype=jnp.int32)
    rows = lambda seq: (seq[:, :, None] * H + heads).reshape(NC, B * H)    # [NC, B] -> [NC, BH]
    reset = jnp.repeat(layout.reset.T, H, axis=1)
    load = rows(layout.seq.T)
    if layout.last_chunk is None:
        last = jnp.arange(NC) == NC - 1
        ends = jnp.where(last[:, None], jnp.arange(B, dtype=jnp.int32)[None, :], N)
    else:  # the sequence that ends with each chunk (N: none); empty sequences end nowhere
        ends = jnp.full(NC, N, jnp.int32).at[jnp.where(layout.empty, NC, layout.last_chunk)].set(
            jnp.arange(N, dtype=jnp.int32), mode="drop")[:, None]
    store = jnp.where(jnp.repeat(ends, H, axis=1) < N, rows(ends), N * H)

    shape = (N * H, K, value_dim)
    h0 = jnp.zeros(shape, acc) if initial_state is None else initial_state.astype(acc).reshape(shape)
    o, final = _chunk_scan(intra, group, inputs, h0, reset, load, store)
    o = from_chunk_major(o.reshape((NC, B, H) + o.shape[1:]), layout)
    return o.astype(q.dtype), final.reshape(N, H, K, value_dim)
