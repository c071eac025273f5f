"""Pieces every op family shares: input checks, impl selection, dtype policy, and the
mapping of (packed) sequences onto fixed-size chunks.

Only jax and numpy are imported here, so any JAX project can use the ops without Flax.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "xla", "pallas")


# ----------------------------------------------------------------------------- checks
def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def check_rank(name: str, x, rank: int) -> tuple:
    """Raise ValueError unless `x` has `rank` dimensions; return its shape."""
    shape = _shape(x)
    if len(shape) != rank:
        raise ValueError(f"`{name}` must have rank {rank}, got shape {shape}")
    return shape


def check_shape(name: str, x, expected: Sequence[int], what: str = "") -> None:
    """Raise ValueError unless `x.shape == expected`, naming the argument and both shapes."""
    shape = _shape(x)
    if shape != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"`{name}` must have shape {tuple(expected)}{hint}, got {shape}")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """Check the `[B, T, H, D]` layout of q, k, v; return (B, T, H, K, V)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4)
    B, T, H, K = q.shape
    check_shape("k", k, q.shape, "must match q [B, T, H, K]")
    if v.shape[:3] != (B, T, H):
        raise ValueError(
            f"`v` must have shape [B, T, H, V] = ({B}, {T}, {H}, V) to match q {q.shape}, "
            f"got {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"`{name}` must be floating point, got dtype {x.dtype}")
    return B, T, H, K, v.shape[3]


def check_chunk_size(chunk_size) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"`chunk_size` must be a positive power of two, got {chunk_size!r}")
    return chunk_size


def check_cu_seqlens(cu_seqlens, batch: int) -> Optional[int]:
    """Return the number N of packed sequences (None without cu_seqlens)."""
    if cu_seqlens is None:
        return None
    shape = check_rank("cu_seqlens", cu_seqlens, 1)
    if shape[0] < 2:
        raise ValueError(f"`cu_seqlens` must have shape [N+1] with N >= 1, got {shape}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"`cu_seqlens` must be an integer array, got dtype {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"`cu_seqlens` needs a batch of one packed row (B == 1), got B = {batch}")
    return shape[0] - 1


def check_initial_state(initial_state, num_states: int, H: int, K: int, V: int) -> None:
    if initial_state is not None:
        check_shape("initial_state", initial_state, (num_states, H, K, V),
                    "[N, H, K, V] with N = number of sequences")


def resolve_impl(impl: str, pallas_available: bool = True) -> str:
    """Map `impl` to a concrete path: 'auto' means pallas on TPU/GPU, xla elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_accelerator = jax.default_backend() in ("tpu", "gpu", "cuda", "rocm")
    return "pallas" if on_accelerator and pallas_available else "xla"


def acc_dtype(x) -> jnp.dtype:
    """Accumulation / state dtype: float32, or float64 when the inputs are float64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def default_scale(scale: Optional[float], K: int) -> float:
    return K ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each sequence starts, token by token (for the token-scan references).

    is_start: [B, T] bool, True where a token begins a sequence (the state is reloaded there).
    seq:      [B, T] int32, which of the N sequences (row of initial_state / final state)
              the token belongs to; tokens past `cu_seqlens[-1]` get seq == N (dropped).
    """
    is_start: jax.Array
    seq: jax.Array
    num_seqs: int


def token_layout(batch: int, T: int, cu_seqlens=None) -> TokenLayout:
    t = jnp.arange(T, dtype=jnp.int32)
    if cu_seqlens is None:
        is_start = jnp.broadcast_to(t == 0, (batch, T))
        seq = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, T))
        return TokenLayout(is_start, seq, batch)
    cu = cu_seqlens.astype(jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    # A zero-length sequence shares its offset with the next one; the token starts the later.
    is_start = t == cu[jnp.minimum(seq, cu.shape[0] - 2)]
    return TokenLayout(is_start[None], seq[None], cu.shape[0] - 1)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Tokens laid out so that every sequence begins on a chunk boundary.

    Without cu_seqlens this is only padding of T up to a multiple of the chunk. With
    cu_seqlens (B == 1) every sequence is moved to start at a chunk boundary, so the chunked
    scans never see a boundary inside a chunk; the positions are computed from the traced
    offsets, so new offsets need no recompilation. Padding tokens carry k = v = 0, zero log
    gates and β = 0, which leave the state unchanged.

    reset:      [B, NC] bool, the chunk starts a sequence: its incoming state is that
                sequence's initial state instead of the previous chunk's state.
    seq:        [B, NC] int32, the sequence whose initial state a reset chunk loads.
    last_chunk: [N] int32, the chunk after which sequence n is complete (varlen only).
    dest:       [T] int32, padded position of each packed token (varlen only; T_pad for
                tokens past cu_seqlens[-1], which are dropped).
    """
    chunk: int
    T: int
    T_pad: int
    reset: jax.Array
    seq: jax.Array
    num_seqs: int
    last_chunk: Optional[jax.Array] = None
    empty: Optional[jax.Array] = None
    dest: Optional[jax.Array] = None

    @property
    def num_chunks(self) -> int:
        return self.T_pad // self.chunk

    def to_chunks(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] -> [B, NC, C, ...] with zeros in the padding."""
        B = x.shape[0]
        if self.dest is None:
            pad = [(0, 0), (0, self.T_pad - self.T)] + [(0, 0)] * (x.ndim - 2)
            xp = jnp.pad(x, pad)
        else:
            xp = jnp.zeros((B, self.T_pad) + x.shape[2:], x.dtype)
            xp = xp.at[:, self.dest].set(x, mode="drop")
        return xp.reshape((B, self.num_chunks, self.chunk) + x.shape[2:])

    def from_chunks(self, x: jax.Array) -> jax.Array:
        """[B, NC, C, ...] -> [B, T, ...], the inverse of `to_chunks` on real tokens."""
        B = x.shape[0]
        xp = x.reshape((B, self.T_pad) + x.shape[3:])
        if self.dest is None:
            return xp[:, : self.T]
        return xp.at[:, self.dest].get(mode="fill", fill_value=0)

    def initial_states(self, h0: Optional[jax.Array], B: int, shape, dtype) -> jax.Array:
        """Incoming state of every reset chunk, [B, NC, H, K, V] gathered from h0 [N, ...]."""
        if h0 is None:
            return jnp.zeros((B, self.num_chunks) + tuple(shape), dtype)
        return h0.astype(dtype)[jnp.minimum(self.seq, self.num_seqs - 1)]

    def final_states(self, states_after: jax.Array, h0: Optional[jax.Array]) -> jax.Array:
        """Final state of each sequence, [N, H, K, V], from the states after each chunk."""
        if self.last_chunk is None:
            return states_after[:, -1]
        final = states_after[0, jnp.maximum(self.last_chunk, 0)]
        init = jnp.zeros_like(final) if h0 is None else h0.astype(final.dtype)
        return jnp.where(self.empty[:, None, None, None], init, final)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def chunk_layout(batch: int, T: int, chunk: int, cu_seqlens=None) -> ChunkLayout:
    if cu_seqlens is None:
        T_pad = max(_round_up(T, chunk), chunk)
        nc = T_pad // chunk
        reset = jnp.broadcast_to(jnp.arange(nc) == 0, (batch, nc))
        seq = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, nc))
        return ChunkLayout(chunk, T, T_pad, reset, seq, batch)

    cu = cu_seqlens.astype(jnp.int32)
    N = cu.shape[0] - 1
    # Each sequence may waste up to chunk-1 padding tokens: a static bound on the padded size.
    T_pad = max(_round_up(T + N * (chunk - 1), chunk), chunk)
    lengths = cu[1:] - cu[:-1]
    padded = (lengths + chunk - 1) // chunk * chunk
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(padded)]).astype(jnp.int32)

    t = jnp.arange(T, dtype=jnp.int32)
    tok_seq = jnp.searchsorted(cu[1:], t, side="right")
    valid = tok_seq < N
    tok_seq_c = jnp.minimum(tok_seq, N - 1)
    dest = jnp.where(valid, starts[tok_seq_c] + t - cu[tok_seq_c], T_pad).astype(jnp.int32)

    nc = T_pad // chunk
    c0 = jnp.arange(nc, dtype=jnp.int32) * chunk
    chunk_seq = jnp.searchsorted(starts[1:], c0, side="right").astype(jnp.int32)
    chunk_seq_c = jnp.minimum(chunk_seq, N - 1)
    reset = (chunk_seq < N) & (c0 == starts[chunk_seq_c])
    last_chunk = (starts[1:] // chunk - 1).astype(jnp.int32)
    return ChunkLayout(chunk, T, T_pad, reset[None], chunk_seq_c[None], N,
                       last_chunk=last_chunk, empty=lengths <= 0, dest=dest)
