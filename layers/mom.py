"""Mixture-of-Memories (`mom`, Du et al., "Linear Sequence Modeling with Mixture-of-Memories"):
M gated-delta-rule memories per layer, each token routed to top_k of them.

  router     p_t = softmax(W_r x_t) over the M memories (float32 or wider); the top_k are
             kept and renormalised to weights w_t summing to 1 (so with top_k = 1 the weight
             is 1 and the router learns from the load-balance loss only).
  memory m   its own k, v, β, decay projections (W_k^m, W_v^m, W_β^m, W_a^m; q and the decay's
             A_log, dt_bias are shared) and its own state, which advances only on the tokens
             routed to it, in order: S^m ← exp(g)(I − β k kᵀ) S^m + β k vᵀ, as in `gdn`.
  shared     with `shared_memory`, one more memory (its own k, v, β, decay projections) that
             every token updates.
  output     o_t = o_t^shared + Σ_m w_t^m · S^mᵀ(scale · q_t) over the routed memories, then
             gdn's output path: o_proj(RMSNorm(o) ⊙ SiLU(W_g x)) per head.

Short convs (with `short_conv`): a memory's k and v convs run over that memory's own
subsequence (its previous routed tokens), with conv kernels shared by all memories, as in the
reference code. By default q is a property of the token, as in the paper (one q_t reads every
memory): its conv runs over the row as in `gdn`. With `q_conv_per_memory`, as fla's
MomAttention computes it, each routed memory convolves q over its own subsequence too (the
shared memory over the row), so token t reads memory m with a q that has seen m's earlier
tokens only; same q_conv kernel, same parameters.

Initialisation as fla's MomAttention: every projection of the layer (router, q, each memory's
k, v, β and decay, the shared memory's, the output gate and o_proj) xavier-uniform with gain
2^−2.5 (a memory's fan-out is its own width, as each is its own nn.Linear there); A ~ U(0, 16]
(fla draws U(0, 16); the open end at 0 keeps A_log finite), dt_bias as in `gdn`, the convs
PyTorch's Conv1d default.

The packed form. Every (token, routed memory) pair is a slot. Each batch row becomes one
packed row of L = T·(1 + top_k) slots (T·top_k without the shared memory): the shared
memory's T slots, then the row's routed slots sorted by (memory, position) with counting
sorts (no argsort), then its dropped ones:

    [ shared: t = 0 .. T−1 ][ memory 0: its tokens ][ memory 1: ... ] ... [ dropped ]

and ONE `gated_delta_rule` call, vmapped over the rows (so the batch stays a batch axis, for
data sharding and for the chunked kernels' parallelism), runs every memory of every row: a
sequence of the call is one (memory, row) group, or with segment_ids one (memory, row,
document) group, at traced offsets `cu_seqlens` [B, N + 1] (new routing needs no
recompilation; empty groups are empty sequences, dropped slots lie past the last offset).
With documents each row has room for every memory plus ceil(L / (2 · chunk_size)) more
sequences (the chunked ops pad each sequence to a chunk, so this keeps the padding under half
the row, as `layers.common.docs_per_row` does for the other mixers); a batch with a row that
needs more takes the exact token scan (`layers.common.restarting_scan`) over the same packed
rows instead. The per-memory projections of the routed slots are, on TPU, one
`jax.lax.ragged_dot` over the batch's slots sorted by (memory, row, position), gathered into
the packed rows; elsewhere XLA would compute that ragged dot as M masked dense products over
all T·top_k slots, so every token goes through every memory's kernel instead (T·M rows, not
T·top_k·M) and the routed ones are gathered (`routed_projection`). Outputs are gathered back
per slot and weighted.

Capacity (`capacity_factor` c, None for no dropping): per batch row and memory, only the first
ceil(c · T · top_k / M) tokens routed to the memory (in sequence order) enter it; later ones
are dropped from it: they do not touch its state or conv inputs, and their weight for it is 0
(the other routed memories and the shared memory still serve the token). With a cache, T is the
cache's max_len and the room left per (row, memory) is part of the cache, so prefill + decode
drops exactly what the full forward over max_len tokens drops.

Auxiliary outputs. The load-balance loss is fla's MomForCausalLM's (its
`load_balancing_loss_func`, Mixtral's): ONE loss over every mom layer's router together,

    mom_load_balance = aux_loss_weight · M · Σ_m F_m · P_m,

F_m the share of all layers' tokens routed to memory m (before dropping; Σ_m F_m = top_k, so
the loss is aux_loss_weight · top_k when balanced), P_m their mean router probability for m
(the gradient flows through P only). Each layer sows its [F, P] (`registry.AUX_POOLED`) and
`load_balance_loss` forms the loss from all of them (every layer sees the same tokens, so the
pooled shares are the means of the layers'). Metrics (`registry.AUX_METRICS`, averaged over
layers): `mom_memory_{m}_fraction` (F_m / top_k: the share of routed slots),
`mom_dropped_fraction` (dropped / routed slots) and `mom_router_entropy` (nats, per token).

Decode cache: the routed states [B, M, H, K, V] and the shared one [B, H, K, V] (float32), the
last conv_size − 1 conv inputs of q per row (with `q_conv_per_memory`: per row and memory, and
for the shared memory, as k's), of k and v per row and memory (and for the shared memory), and
with a capacity the room left [B, M]. One token (T == 1) runs the one-token step
on every memory at once, with β = 0 and g = 0 (an exact no-op) for the memories it is not
routed to; a longer chunk (prefill) takes the packed path from the cached states.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (PackedRows, constrain, dense, docs_per_row, dt_bias_init,
                           head_param, packed_or_scanned, restarting_scan, segment_starts)
from layers.conv import conv_settings, qkv_conv_cache
from layers.norm import GatedRMSNorm
from layers.registry import (AUX_METRICS, AUX_POOLED, Mechanism, Setting, SettingError, Shared,
                             positive_int, register)
from pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step


XAVIER_GAIN = 2 ** -2.5     # fla's MomAttention._initialize_weights


def xavier(num_in: int, batch: tuple = ()):
    """fla's xavier-uniform (gain 2^−2.5) for a kernel whose first `num_in` axes are its inputs
    and the rest, but the `batch` axes (one nn.Linear each), its outputs:
    U(±gain · sqrt(6 / (fan_in + fan_out)))."""
    def init_fn(key, shape, dtype=jnp.float32):
        out = tuple(a for a in range(num_in, len(shape)) if a not in batch)
        return nn.initializers.variance_scaling(
            XAVIER_GAIN ** 2, "fan_avg", "uniform", in_axis=tuple(range(num_in)), out_axis=out,
            batch_axis=batch)(key, shape, dtype)
    return init_fn


def a_log_init(key, shape, dtype=jnp.float32):
    """A_log = log(A), A ~ U(0, 16] per head: fla's MomAttention draws U(0, 16) (gdn's layer
    here: U(1, 16), Mamba2's); 16 · (1 − u) for u ~ U[0, 1) never gives log(0)."""
    return jnp.log(16.0 * (1.0 - jax.random.uniform(key, shape, dtype)))


class MemoryKernel(nn.Module):
    """The kernel [embed, memory, *features] of a per-memory projection (each memory's
    initialised as its own xavier nn.Linear); the caller applies it to the routed slots
    (`routed_projection`)."""
    shape: tuple
    axes: tuple

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.with_logical_partitioning(xavier(1, batch=(1,)), self.axes),
                          self.shape, jnp.float32)


class ConvKernel(nn.Module):
    """The depthwise kernel [W, heads, kv] of a short conv over packed groups, initialised
    U(±1/√W), PyTorch's Conv1d default, which fla's MomAttention keeps (the layer marks its
    modules initialised, so the model's N(0, 0.02) re-initialisation passes them by)."""
    shape: tuple

    @nn.compact
    def __call__(self):
        bound = 1.0 / self.shape[0] ** 0.5

        def uniform(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        return self.param("kernel", nn.with_logical_partitioning(uniform, (None, "heads", "kv")),
                          self.shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Routing:
    """The routing of a [B, T] batch and where its slots go.

    In its row's routed part, the kept slots sorted by (memory, position), then the dropped
    ones: `dest` [B, T, k] is each slot's place there, `token`, `memory` [B, T·k] the token
    (position in the row) and memory at each place. For the projections, all kept slots of
    the batch sorted by (memory, row, position), then the dropped ones: `source` [B·T·k] is
    the flat token (b·T + t) at each place of that order and `gather` [B, T·k] the place of
    each row's routed part in it.
    weights [B, T, k]: the renormalised top-k weights, 0 where the slot was dropped.
    counts [B, M]: slots kept per (row, memory).
    routed [B, T, M]: the token is routed to the memory (before dropping).
    room: what is left of each (row, memory)'s capacity afterwards (None: no capacity).
    """
    probs: jax.Array
    weights: jax.Array
    dest: jax.Array
    token: jax.Array
    memory: jax.Array
    source: jax.Array
    gather: jax.Array
    counts: jax.Array
    routed: jax.Array
    room: Optional[jax.Array]


def _exclusive_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis, dtype=jnp.int32) - x


def route(probs: jax.Array, top_k: int, room: Optional[jax.Array]) -> Routing:
    """Top-k routing of router probabilities [B, T, M]; `room` [B, M]: how many more tokens
    each (row, memory) may take (None: unlimited). Counting sorts, no argsort."""
    B, T, M = probs.shape
    Tk = T * top_k
    top, idx = jax.lax.top_k(probs, top_k)
    weights = top / jnp.sum(top, axis=-1, keepdims=True)
    routed = jnp.any(idx[..., None] == jnp.arange(M), axis=2)                 # [B, T, M]
    rank = _exclusive_cumsum(routed.astype(jnp.int32), 1)                    # earlier ones
    kept_tm = routed if room is None else routed & (rank < room[:, None, :])
    kept = jnp.take_along_axis(kept_tm, idx, axis=2)
    rank = jnp.take_along_axis(rank, idx, axis=2)
    counts = jnp.sum(kept_tm, axis=1, dtype=jnp.int32)
    dropped = (~kept).astype(jnp.int32)
    rows = jnp.arange(B)[:, None, None]

    # In the row: memory m's slots start after the row's earlier memories'.
    start = jnp.take_along_axis(_exclusive_cumsum(counts, 1), idx.reshape(B, Tk), axis=1)
    drop_rank = _exclusive_cumsum(dropped.reshape(B, Tk), 1)
    dest = jnp.where(kept, start.reshape(kept.shape) + rank,
                     (jnp.sum(counts, 1)[:, None] + drop_rank).reshape(kept.shape))
    place = jnp.arange(Tk, dtype=jnp.int32)
    slot = jnp.zeros((B, Tk), jnp.int32).at[rows[..., 0], dest.reshape(B, Tk)].set(place)

    # In the batch: memory m's slots of row b start after all earlier memories' and memory
    # m's slots of earlier rows.
    by_memory = counts.T.reshape(-1)
    start = _exclusive_cumsum(by_memory, 0).reshape(M, B)[idx, rows]
    drop_rank = _exclusive_cumsum(dropped.reshape(-1), 0).reshape(kept.shape)
    batch_dest = jnp.where(kept, start + rank, jnp.sum(by_memory) + drop_rank)
    S = B * Tk
    source = jnp.zeros(S, jnp.int32).at[batch_dest.reshape(-1)].set(
        jnp.arange(S, dtype=jnp.int32)) // top_k

    new_room = None
    if room is not None:
        new_room = jnp.maximum(room - jnp.sum(routed, axis=1, dtype=jnp.int32), 0)
    return Routing(probs, jnp.where(kept, weights, 0), dest, slot // top_k,
                   jnp.take_along_axis(idx.reshape(B, Tk), slot, axis=1), source,
                   jnp.take_along_axis(batch_dest.reshape(B, Tk), slot, axis=1), counts,
                   routed, new_room)


@dataclasses.dataclass(frozen=True)
class Packed:
    """The packed rows [B, L], L = T·shared + T·k: the shared memory's T slots, then the
    routed part (`Routing.dest`).

    token [B, L]: the position in the row of each slot's token; group [B, L]: its memory (0
    the shared one, then shared + m; num_groups for dropped slots); valid [B, L]: not
    dropped; starts [B, L]: the slot begins a sequence (a group, or with documents a group's
    document); cu_full [B, num_groups + 1]: the offsets of the groups (whatever the
    documents); length_kept [B]: slots before the dropped ones."""
    token: jax.Array
    group: jax.Array
    valid: jax.Array
    starts: jax.Array
    cu_full: jax.Array
    num_groups: int
    length_kept: jax.Array


def pack(r: Routing, T: int, shared: bool, docs: Optional[jax.Array]) -> Packed:
    B, M = r.counts.shape
    Ts, s = (T, 1) if shared else (0, 0)
    n_kept = jnp.sum(r.counts, axis=1)
    routed_valid = jnp.arange(r.token.shape[1]) < n_kept[:, None]
    token = jnp.concatenate([jnp.broadcast_to(jnp.arange(Ts, dtype=jnp.int32), (B, Ts)),
                             r.token], axis=1)
    group = jnp.concatenate([jnp.zeros((B, Ts), jnp.int32),
                             jnp.where(routed_valid, s + r.memory, s + M)], axis=1)
    valid = jnp.concatenate([jnp.ones((B, Ts), bool), routed_valid], axis=1)
    changed = lambda a: jnp.pad(a[:, 1:] != a[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    new = changed(group)
    if docs is not None:
        new = new | changed(jnp.take_along_axis(docs, token, axis=1))
    lengths = jnp.concatenate([jnp.full((B, s), T, jnp.int32), r.counts], axis=1)
    cu_full = jnp.pad(jnp.cumsum(lengths, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
    return Packed(token, group, valid, new & valid, cu_full, s + M, Ts + n_kept)


def row_packing(B: int, T: int, segment_ids=None) -> Packed:
    """Each row as one group of its T tokens in order (documents restart it): `packed_conv`
    over it is the row's short conv."""
    starts = (jnp.broadcast_to(jnp.arange(T) == 0, (B, T)) if segment_ids is None
              else segment_starts(segment_ids))
    zeros = jnp.zeros((B, T), jnp.int32)
    return Packed(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), zeros,
                  jnp.ones((B, T), bool), starts, jnp.tile(jnp.array([0, T], jnp.int32), (B, 1)),
                  1, jnp.full((B,), T, jnp.int32))


def packed_conv(x, kernel, p: Packed, hist=None):
    """SiLU of the causal depthwise conv of packed slots x [B, L, H, D] within each sequence
    (a slot sees only earlier slots of its own sequence), in float32 or wider; with `hist`
    [B, N, W−1, H, D] (a cache: no documents) each group continues from its last W−1 inputs.
    Returns (y in x's dtype, the groups' new last W−1 inputs or None)."""
    B, L, W = x.shape[0], x.shape[1], kernel.shape[0]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    pos = jnp.arange(L)
    since = pos - jax.lax.cummax(jnp.where(p.starts, pos, 0), axis=1)  # earlier, same sequence
    xp = jnp.pad(x, [(0, 0), (W - 1, 0)] + [(0, 0)] * (x.ndim - 2))
    y = jnp.zeros(x.shape, acc)
    rows = jnp.arange(B)[:, None]
    bcast = lambda m: m.reshape(m.shape + (1,) * (x.ndim - 2))
    for lag in range(W):
        term = xp[:, W - 1 - lag: W - 1 - lag + L]
        if lag:
            inside = bcast(lag <= since)
            if hist is None:
                term = jnp.where(inside, term, 0)
            else:
                at = jnp.clip(W - 1 - lag + since, 0, W - 2)
                earlier = hist[rows, jnp.minimum(p.group, p.num_groups - 1), at]
                term = jnp.where(inside, term, earlier)
        y = y + term.astype(acc) * kernel[W - 1 - lag].astype(acc)
    y = jax.nn.silu(y).astype(x.dtype)
    if hist is None:
        return y, None
    start, length = p.cu_full[:, :-1], p.cu_full[:, 1:] - p.cu_full[:, :-1]
    back = length[..., None] + jnp.arange(W - 1) - (W - 1)     # [B, N, W−1], < 0: from hist
    from_x = x[rows[..., None], jnp.clip(start[..., None] + back, 0, L - 1)]
    from_hist = jnp.take_along_axis(hist, bcast(jnp.clip(back + W - 1, 0, W - 2)), axis=2)
    return y, jnp.where(bcast(back >= 0), from_x, from_hist)


def ragged_dot_is_native() -> bool:
    """Whether XLA runs ragged_dot as a grouped matmul here (TPU). Elsewhere it computes it as
    one masked dense product per group (CPU; GPU unless a cuDNN grouped-GEMM rewrite applies),
    i.e. num_memories × the routed slots' rows."""
    return jax.default_backend() == "tpu"


def routed_projection(x, w, r: Routing):
    """The routed slots' per-memory projections [B, T·k, F], in each row's routed-part order,
    of x [B, T, d] with the kernels w [M, d, F]. With a native ragged_dot: one over the batch's
    memory-sorted slots (T·k rows); otherwise every token through every memory's kernel
    (T·M rows, fewer than the T·k·M of a ragged_dot made dense) and the routed ones gathered."""
    B, T, d = x.shape
    if not ragged_dot_is_native():
        y = jnp.einsum("btd,mdf->btmf", x, w)
        return y[jnp.arange(B)[:, None], r.token, r.memory]
    sizes = jnp.sum(r.counts, axis=0)
    y = jax.lax.ragged_dot(x.reshape(B * T, d)[r.source], w, sizes)
    # Rows past the last group (the dropped slots) are not defined on every backend.
    return jnp.where((jnp.arange(y.shape[0]) < jnp.sum(sizes))[:, None], y, 0)[r.gather]


class MixtureOfMemories(nn.Module):
    d_model: int
    num_heads: int
    head_dim: int
    num_memories: int = 4
    top_k: int = 2
    shared_memory: bool = True
    capacity_factor: Optional[float] = None
    aux_loss_weight: float = 0.01
    expand_v: float = 1.0
    conv_size: int = 4
    use_short_conv: bool = True
    q_conv_per_memory: bool = False
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    chunk_size: int = 64

    @property
    def value_dim(self) -> int:
        return int(round(self.head_dim * self.expand_v))

    def capacity(self, length: int) -> Optional[int]:
        """Tokens a memory takes per row of `length` tokens (None: no capacity)."""
        if self.capacity_factor is None:
            return None
        c = self.capacity_factor * length * self.top_k / self.num_memories
        return length if c >= length else math.ceil(c)

    def init_cache(self, batch: int, max_len: int) -> dict:
        H, K, V, M, W = (self.num_heads, self.head_dim, self.value_dim, self.num_memories,
                         self.conv_size)
        cache = {"state": jnp.zeros((batch, M, H, K, V), jnp.float32)}
        if self.shared_memory:
            cache["shared_state"] = jnp.zeros((batch, H, K, V), jnp.float32)
        if self.use_short_conv:
            if not self.q_conv_per_memory:
                cache.update(qkv_conv_cache(batch, {"q": (H, K)}, W, self.dtype))
            for n, D in self._grouped_convs():
                cache[f"conv_{n}"] = jnp.zeros((batch, M, W - 1, H, D), self.dtype)
                if self.shared_memory:
                    cache[f"shared_conv_{n}"] = jnp.zeros((batch, W - 1, H, D), self.dtype)
        if self.capacity_factor is not None:
            cache["room"] = jnp.full((batch, M), self.capacity(max_len), jnp.int32)
        return cache

    def _grouped_convs(self):
        """(name, width) of the convs that run per memory over the packed groups."""
        K, V = self.head_dim, self.value_dim
        return (("q", K),) * self.q_conv_per_memory + (("k", K), ("v", V))

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for training on packed rows, not with a cache")
        B, T, d = x.shape
        H, K, V, M = self.num_heads, self.head_dim, self.value_dim, self.num_memories
        kw = dict(std=None, dtype=self.dtype)

        acc = jnp.promote_types(self.dtype, jnp.float32)
        logits = dense(M, ("embed", "memory"), std=None, dtype=acc, kernel_init=xavier(1),
                       name="router")(x)
        probs = jax.nn.softmax(logits, axis=-1)
        room = None
        if self.capacity_factor is not None:
            room = (jnp.full((B, M), self.capacity(T), jnp.int32) if cache is None
                    else cache["room"])
        r = route(probs, self.top_k, room)
        self._sow_aux(r)
        docs = None if segment_ids is None else jnp.cumsum(segment_starts(segment_ids), axis=1)
        p = pack(r, T, self.shared_memory, docs)

        q = dense((H, K), ("embed", "heads", "kv"), kernel_init=xavier(1), name="q_proj", **kw)(x)
        new_cache = {}
        if self.use_short_conv and not self.q_conv_per_memory:
            hist = None if cache is None else cache["conv_q"][:, None]
            q, hist = packed_conv(q, ConvKernel((self.conv_size, H, K), name="q_conv")(),
                                  row_packing(B, T, segment_ids), hist)
            if cache is not None:
                new_cache["conv_q"] = hist[:, 0]
        elif not self.use_short_conv:
            q = jax.nn.silu(q)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        # Each slot's q (the projection is per token, so gathering it equals fla's projecting
        # the memory's tokens); with q_conv_per_memory its conv follows, over the groups.
        packed = {"q": jnp.take_along_axis(q, p.token[..., None, None], axis=1)}
        packed["k"], packed["v"], b, a = self._project(x, r)
        hists = {}
        if self.use_short_conv:
            for n, D in self._grouped_convs():
                hist = None if cache is None else self._groups(cache, f"conv_{n}")[0]
                packed[n], hists[n] = packed_conv(
                    packed[n], ConvKernel((self.conv_size, H, D), name=f"{n}_conv")(), p, hist)
        else:
            packed["k"], packed["v"] = jax.nn.silu(packed["k"]), jax.nn.silu(packed["v"])
        q, k, v = (constrain(packed[n], ("batch", "length", "heads", "kv")) for n in "qkv")
        beta = jax.nn.sigmoid(b.astype(acc))
        dt = jax.nn.softplus(a.astype(acc) + head_param(self, "dt_bias", dt_bias_init, H))
        g = -jnp.exp(head_param(self, "A_log", a_log_init, H)) * dt

        state = None if cache is None else self._groups(cache, "state")[0]
        o, state = self._recurrence(q, k, v, beta, g, p, state, step=cache is not None and T == 1,
                                    has_docs=docs is not None)

        o = o.astype(acc)
        Ts = T if self.shared_memory else 0
        slots = jnp.take_along_axis(o[:, Ts:], r.dest.reshape(B, -1)[..., None, None], axis=1)
        out = jnp.einsum("btj,btjhv->bthv", r.weights, slots.reshape(B, T, self.top_k, H, V))
        if self.shared_memory:
            out = out + o[:, :T]
        gate = dense((H, V), ("embed", "heads", "kv"), kernel_init=xavier(1), name="g_proj",
                     **kw)(x)
        out = GatedRMSNorm(self.norm_eps, self.dtype, name="o_norm")(out, gate)
        out = constrain(out, ("batch", "length", "heads", "kv"))
        y = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), kernel_init=xavier(2),
                  name="o_proj", **kw)(out)
        if cache is None:
            return y, None
        routed = {"state": state, **{f"conv_{n}": h for n, h in hists.items()}}
        for n, c in routed.items():
            new_cache.update(self._ungroup(c, n))
            # The routed memories' entries [B, M, ...] carry the memory axis (rules may shard it).
            new_cache[n] = constrain(new_cache[n],
                                     ("batch", "memory") + (None,) * (new_cache[n].ndim - 2))
        if r.room is not None:
            new_cache["room"] = r.room
        return y, new_cache

    def _project(self, x, r: Routing):
        """k, v [B, L, H, K|V], b, a [B, L, H] of the packed rows: the shared memory's by dense
        projections of every token, the routed slots' with the concatenated per-memory kernels
        (`routed_projection`)."""
        B, T, d = x.shape
        H, K, V, M = self.num_heads, self.head_dim, self.value_dim, self.num_memories
        widths = (("k_proj", (K,)), ("v_proj", (V,)), ("b_proj", ()), ("a_proj", ()))
        kernels = [MemoryKernel((d, M, H) + f, ("embed", "memory", "heads") + ("kv",) * len(f),
                                name=n)() for n, f in widths]
        w = jnp.concatenate([kr.reshape(d, M, -1).transpose(1, 0, 2) for kr in kernels], -1)
        y = routed_projection(x.astype(self.dtype), w.astype(self.dtype), r)
        cuts = [H * K, H * (K + V), H * (K + V + 1)]
        routed = [t.reshape((B, -1, H) + f) for t, (_, f) in zip(jnp.split(y, cuts, -1), widths)]
        if not self.shared_memory:
            return routed
        shared = [dense((H,) + f, ("embed", "heads") + ("kv",) * len(f), std=None,
                        dtype=self.dtype, kernel_init=xavier(1), name=f"shared_{n}")(x)
                  for n, f in widths]
        return [jnp.concatenate([s, t], axis=1) for s, t in zip(shared, routed)]

    def _groups(self, cache, *names):
        """Cache entries [B, M, ...] (and shared_* [B, ...] first) as the packed rows' groups
        [B, N, ...]."""
        if not self.shared_memory:
            return [cache[n] for n in names]
        return [jnp.concatenate([cache[f"shared_{n}"][:, None], cache[n]], axis=1)
                for n in names]

    def _ungroup(self, x, name: str) -> dict:
        if not self.shared_memory:
            return {name: x}
        return {name: x[:, 1:], f"shared_{name}": x[:, 0]}

    def _recurrence(self, q, k, v, beta, g, p: Packed, state, *, step: bool, has_docs: bool):
        """o [B, L, H, V] of the packed rows and the groups' final states [B, N, H, K, V] (with
        a cache). Each row is a packed row of the op (vmapped: the batch stays parallel).
        step: one token per row with a cache."""
        B, L = p.token.shape
        N = p.num_groups
        op_kw = dict(use_qk_l2norm=True)
        chunk_kw = dict(impl=self.impl, chunk_size=self.chunk_size)
        args = (q, k, v, beta, g)
        if step:
            # A group holds at most one slot: run the step on every group, with β = g = 0
            # (no change) where a group got none.
            rows = jnp.arange(B)[:, None]

            def per_group(t):
                full = jnp.zeros((B, N) + t.shape[2:], t.dtype)
                return full.at[rows, p.group].set(t, mode="drop").reshape((B * N,) + t.shape[2:])

            o, state = gated_delta_rule_step(*map(per_group, args),
                                             state=state.reshape((B * N,) + state.shape[2:]),
                                             **op_kw)
            o = o.reshape((B, N) + o.shape[1:])[rows, jnp.minimum(p.group, N - 1)]
            return (jnp.where(p.valid[..., None, None], o, 0),
                    state.reshape((B, N) + state.shape[1:]))

        def row(cu, h0, *a):
            o, h = gated_delta_rule(*(t[None] for t in a), cu_seqlens=cu, initial_state=h0,
                                    output_final_state=h0 is not None, **op_kw, **chunk_kw)
            return o[0], h

        if not has_docs:
            return jax.vmap(row)(p.cu_full, state, *args)
        # Room for every group, plus as many document starts as keep the chunked ops' padding
        # (a chunk per sequence at most) under half the row.
        cap = min(N + docs_per_row(L, self.chunk_size) - 1, L)
        cu = jax.vmap(lambda st, n: jnp.nonzero(st, size=cap, fill_value=n)[0])(
            p.starts, p.length_kept)
        cu = jnp.concatenate([cu, p.length_kept[:, None]], axis=1).astype(jnp.int32)
        rows = PackedRows(cu, jnp.all(jnp.sum(p.starts, axis=1) <= cap), p.starts)
        scan = lambda a: restarting_scan(gated_delta_rule_step, a, p.starts, **op_kw)
        return packed_or_scanned(rows, lambda c, *a: row(c, None, *a)[0], scan, args), None

    def _sow_aux(self, r: Routing):
        if self.is_initializing():
            # Not into init's variables: passed back to apply_with_aux they would count twice,
            # and lazy_init cannot compute values that depend on the input.
            return
        M = self.num_memories
        stats = balance_stats(r)
        self.sow(AUX_POOLED, "mom_load_balance", stats)
        for m in range(M):
            self.sow(AUX_METRICS, f"mom_memory_{m}_fraction", stats[m] / self.top_k)
        self.sow(AUX_METRICS, "mom_dropped_fraction",
                 1.0 - jnp.sum(r.counts) / jnp.sum(r.routed, dtype=jnp.float32))
        entropy = -jnp.sum(r.probs * jnp.log(jnp.maximum(r.probs, 1e-30)), axis=-1)
        self.sow(AUX_METRICS, "mom_router_entropy", jnp.mean(entropy))


def balance_stats(r: Routing) -> jax.Array:
    """A layer's load-balance statistics [F (M), P (M)] float32: the share of its tokens routed
    to each memory (before dropping; Σ F = top_k) and the mean router probabilities."""
    share = jnp.mean(r.routed, axis=(0, 1), dtype=jnp.float32)
    return jnp.concatenate([share, jnp.mean(r.probs, axis=(0, 1)).astype(jnp.float32)])


def load_balance_loss(settings, stats):
    """fla's MomForCausalLM load balance over all mom layers together, from each layer's sowed
    [F (M), P (M)] (stats [layers, 2M]): aux_loss_weight · M · Σ_m mean(F_m) · mean(P_m)."""
    M = stats.shape[-1] // 2
    share, prob = jnp.mean(stats[:, :M], axis=0), jnp.mean(stats[:, M:], axis=0)
    return settings["aux_loss_weight"] * M * jnp.sum(jax.lax.stop_gradient(share) * prob)


_SETTINGS = {
    "num_memories": Setting(4, int, "M: routed memories (gated-delta-rule states) per layer"),
    "top_k": Setting(2, int, "memories each token is routed to"),
    "shared_memory": Setting(True, bool, "one more memory that every token updates"),
    "capacity_factor": Setting(None, float, "per row and memory at most "
                               "ceil(capacity_factor · T · top_k / M) tokens, later ones "
                               "dropped from it; None: no dropping", optional=True),
    "aux_loss_weight": Setting(0.01, float, "weight of the load-balance loss M · Σ F_m P_m over "
                               "all mom layers together (fla's aux_loss_scale)"),
    "expand_v": Setting(1.0, float, "value head width = expand_v · head_dim"),
    **conv_settings(True),
    "q_conv_per_memory": Setting(False, bool, "q's short conv over each memory's own tokens, "
                                 "as fla's MomAttention (False: over the row, one q per token)"),
}


def _check(shared: Shared, s) -> None:
    positive_int(s, "num_memories", "top_k", "conv_size")
    # Slot counts (B·T·(1 + top_k)) and memory indices (num_memories + 1 with the shared one)
    # are int32 inside the layer: keep the counts far from its range.
    if s["num_memories"] > 2**16:
        raise SettingError("num_memories", f"must be <= 65536, got {s['num_memories']}")
    if s["top_k"] > s["num_memories"]:
        raise SettingError("top_k", f"must be <= num_memories ({s['num_memories']}), "
                                    f"got {s['top_k']}")
    if s["capacity_factor"] is not None and not s["capacity_factor"] > 0:
        raise SettingError("capacity_factor", f"must be > 0 (None: no capacity), "
                                              f"got {s['capacity_factor']}")
    if not s["aux_loss_weight"] >= 0:
        raise SettingError("aux_loss_weight", f"must be >= 0, got {s['aux_loss_weight']}")
    width = shared.head_dim * s["expand_v"]
    if not (s["expand_v"] > 0 and float(width).is_integer()
            and width <= jnp.iinfo(jnp.int32).max):
        raise SettingError("expand_v", f"must be > 0 with expand_v · head_dim "
                                       f"({shared.head_dim}) an integer <= 2**31 - 1, "
                                       f"got {s['expand_v']}")


def _build(shared: Shared, s, name):
    return MixtureOfMemories(
        d_model=shared.d_model, num_heads=shared.num_heads, head_dim=shared.head_dim,
        num_memories=s["num_memories"], top_k=s["top_k"], shared_memory=s["shared_memory"],
        capacity_factor=s["capacity_factor"], aux_loss_weight=s["aux_loss_weight"],
        expand_v=s["expand_v"], conv_size=s["conv_size"], use_short_conv=s["short_conv"],
        q_conv_per_memory=s["q_conv_per_memory"], norm_eps=shared.norm_eps, dtype=shared.dtype,
        impl=shared.impl, chunk_size=shared.chunk_size, name=name)


register(Mechanism("mom", "token", _build, _SETTINGS, _check,
                   "Mixture-of-Memories: top-k routed gated-delta-rule memories (+ a shared one)",
                   recurrent=True, pooled_losses={"mom_load_balance": load_balance_loss}))
