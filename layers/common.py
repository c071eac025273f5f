"""Small helpers every layer shares: logically-partitioned initialisers and dense layers,
segment-id bookkeeping for packed documents, and the calls of the recurrent ops."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

AXIS_NAMES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "memory", "expert")


def init(std: float, axes: Sequence[Optional[str]]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes))


class Dense(nn.Module):
    """x[..., *in] @ kernel[*in, *features] (+ bias), contracting the input axes `axis`.

    The kernel is created at its final shape, so its logical axis names apply as they are:
    flax's DenseGeneral initialises a flat 2-D kernel and reshapes it, and the sharding
    constraint of a 3-name partitioning on that flat kernel fails under a device mesh."""
    features: tuple
    axes: tuple
    std: float
    dtype: jnp.dtype
    axis: tuple = (-1,)
    use_bias: bool = False
    kernel_init: Optional[Callable] = None    # an initializer instead of N(0, std²)

    @nn.compact
    def __call__(self, x):
        axis = tuple(a % x.ndim for a in self.axis)
        kernel_init = (init(self.std, self.axes) if self.kernel_init is None
                       else nn.with_logical_partitioning(self.kernel_init, self.axes))
        kernel = self.param("kernel", kernel_init,
                            tuple(x.shape[a] for a in axis) + self.features, jnp.float32)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), (axis, tuple(range(len(axis)))))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[-len(self.features):]), self.features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def dense(features, axes, *, std, dtype, axis=-1, name=None, use_bias=False, kernel_init=None):
    """A `Dense` whose kernel carries logical axis names `axes` (input dims first), initialised
    N(0, std²) or by `kernel_init`."""
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return Dense(as_tuple(features), tuple(axes), std, dtype, as_tuple(axis), use_bias,
                 kernel_init, name=name)


def constrain(x, axes):
    return nn.with_logical_constraint(x, tuple(axes))


def project_out_with_state(o, d_model: int, state, cache, new_cache: dict, **kw):
    """The recurrent mixers' last step, inside their compact `__call__`: o [B, T, H, V] through
    `o_proj` to the model width, and the decode cache with the op's new state (None when the
    call has no cache). `kw`: `dense`'s std and dtype."""
    o = constrain(o, ("batch", "length", "heads", "kv"))
    y = dense(d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **kw)(o)
    return y, None if cache is None else {**new_cache, "state": state}


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: the token begins a document (it begins its row, or its id differs from the
    previous token's)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(change, ((0, 0), (1, 0)), constant_values=True)


def document_ids(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: the document of each token, counted from 1 along its row. Masks compare
    these, not the segment ids, since an id may come back after another (1, 1, 2, 1 is three
    documents)."""
    return jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: position of each token inside its document."""
    T = segment_ids.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None]
    start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)
    return t - start


def docs_per_row(length: int, chunk_size: int) -> int:
    """Documents a row of `length` tokens may hold and still take the packed path of
    `step_or_chunk`: one, plus one per two chunks.

    The chunked ops start every packed sequence on a chunk boundary, and with a static shape
    they must reserve room (up to chunk_size - 1 padding tokens, and a state) for every entry
    of cu_seqlens, used or not: room for all `length` possible documents would multiply their
    time and memory by about chunk_size. This bound keeps the reserved padding under half a
    row (plus one chunk)."""
    return 1 + -(-length // (2 * chunk_size))


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """The documents of a [B, T] batch as the recurrent ops take packed sequences: each row is
    its own B == 1 packed row with offsets `cu_seqlens` [B, capacity + 1] (traced values of a
    static shape, so new segment ids need no recompilation; unused entries equal T, empty
    sequences that cost the ops nothing). `fits` (bool scalar): no row has more than
    `capacity` documents, so every document has its own sequence. `starts` [B, T] bool."""
    cu_seqlens: jax.Array
    fits: jax.Array
    starts: jax.Array


def pack_rows(segment_ids: jax.Array, capacity: int) -> PackedRows:
    B, T = segment_ids.shape
    starts = segment_starts(segment_ids)
    first = jax.vmap(lambda s: jnp.nonzero(s, size=capacity, fill_value=T)[0])(starts)
    cu = jnp.concatenate([first, jnp.full((B, 1), T)], axis=1).astype(jnp.int32)
    return PackedRows(cu, jnp.all(jnp.sum(starts, axis=1) <= capacity), starts)


def packed_or_scanned(rows: PackedRows, row, scan, args, *, batched: bool = False):
    """o of a recurrent op restarted at every document: `row(cu_seqlens, *xs)` on each row as
    one packed sequence (vmapped over rows, so the batch axis stays a batch axis for sharding
    and for the ops' parallelism) when `rows.fits`, else `scan(args)`, a token scan exact for
    any number of documents. The predicate is one scalar for the whole batch, so lax.cond runs
    one branch (a per-row one would turn into a select of both). Both branches are
    checkpointed: differentiating lax.cond keeps the residuals of both branches (zeros for the
    one not taken), so each keeps only its inputs instead. `batched`: `row` takes every row
    at once (cu_seqlens [B, n + 1], xs [B, T, ...]) and does its own vmap."""
    rows_fn = row if batched else jax.vmap(row)
    return jax.lax.cond(rows.fits,
                        jax.checkpoint(lambda a: rows_fn(rows.cu_seqlens, *a)),
                        jax.checkpoint(scan), args)


def blocked_token_scan(token, carry, xs, T: int):
    """`lax.scan` of token(carry, x) -> (carry, y) over the T tokens of xs (a pytree of
    [B, T, ...] arrays, None allowed), in blocks of about sqrt(T) tokens that are each
    rematerialised, so a backward pass holds O(sqrt(T)) carries rather than one per token.
    The last block is zero-padded: `token` sees zeros there, its outputs are dropped, and a
    carry that must survive the padding is for `token` to keep. Returns (carry, y [B, T, ...]),
    y a pytree as `token` returns it."""
    n = math.isqrt(max(T - 1, 0)) + 1
    nb = -(-T // n)

    def blocks(x):   # [B, T, ...] -> [nb, n, B, ...]
        x = jnp.pad(x, [(0, 0), (0, nb * n - T)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((x.shape[0], nb, n) + x.shape[2:]), 0, 2)

    block = jax.checkpoint(lambda c, xb: jax.lax.scan(token, c, xb))
    carry, y = jax.lax.scan(block, carry, jax.tree.map(blocks, xs))
    unblock = lambda y: jnp.moveaxis(y, 2, 0).reshape((y.shape[2], nb * n) + y.shape[3:])[:, :T]
    return carry, jax.tree.map(unblock, y)


def restarting_scan(step_op, args, starts: jax.Array, **kw) -> jax.Array:
    """o [B, T, H, V] of a recurrent op's one-token `step_op` run token by token over args
    ([B, T, ...], None allowed; args[0] = q, args[2] = v) from a zero state, zeroed again
    wherever `starts` [B, T] is set: exact for any number of documents, but sequential in T
    (`blocked_token_scan`)."""
    B, T = starts.shape
    q, v = args[0], args[2]

    def token(S, inp):
        x, start = inp
        o, S = step_op(*x, state=jnp.where(start[:, None, None, None], 0, S), **kw)
        return S, o

    S0 = jnp.zeros((B,) + q.shape[2:] + v.shape[3:], jnp.promote_types(q.dtype, jnp.float32))
    return blocked_token_scan(token, S0, (tuple(args), starts), T)[1]


# ----------------------------------------------------------------------------- Mamba2 inits
def a_log_init(key, shape, dtype=jnp.float32):
    """A_log = log(A), A ~ U(1, 16) per head (Mamba2)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
    """dt_bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max] (Mamba2)."""
    u = jax.random.uniform(key, shape, dtype)
    dt = jnp.exp(u * (jnp.log(dt_max) - jnp.log(dt_min)) + jnp.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def head_param(module: nn.Module, name: str, init_fn, num_heads: int) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init_fn, ("heads",)), (num_heads,),
                        jnp.float32)


def step_or_chunk(op, step_op, *args, state, segment_ids=None, **kw):
    """Run a recurrent op over [B, T, ...] inputs (args; None allowed) for the three modes:
    training (state None; with segment_ids [B, T] every document starts from a zero state),
    one decode token (T == 1: the O(1) `step_op`), a prefill/chunk from a cached state.
    Returns (o [B, T, H, V], new state or None)."""
    chunk_kw = {k: kw.pop(k) for k in ("impl", "chunk_size")}
    if segment_ids is not None:
        if state is not None:
            raise ValueError("segment_ids are for training on packed rows, not with a state")
        return _documents(op, step_op, args, segment_ids, kw, chunk_kw), None
    if state is None:
        if context_size(args[0].shape[1]) > 1:   # T split over the mesh's context axis
            run = lambda *xs: op(*xs, **kw, **chunk_kw, context_axis=CONTEXT_AXIS)[0]
            return over_context(run, (TOKENS,) * len(args), TOKENS)(*args), None
        o, _ = op(*args, **kw, **chunk_kw)
        return o, None
    if args[0].shape[1] == 1:
        o, new = step_op(*(None if a is None else a[:, 0] for a in args), state=state, **kw)
        return o[:, None], new
    return op(*args, initial_state=state, output_final_state=True, **kw, **chunk_kw)


def _documents(op, step_op, args, segment_ids, kw, chunk_kw):
    """o of the op from a zero state at every document (`packed_or_scanned`, with
    `restarting_scan` when some row holds more documents than `docs_per_row` allows)."""
    rows = pack_rows(segment_ids, docs_per_row(segment_ids.shape[1], chunk_kw["chunk_size"]))
    cp = context_size(segment_ids.shape[1]) > 1

    def row(cu, *xs):
        o, _ = op(*(None if x is None else x[None] for x in xs), cu_seqlens=cu, **kw,
                  **chunk_kw, **({"context_axis": CONTEXT_AXIS} if cp else {}))
        return o[0]

    # With T split over the context axis, the offsets (from the global segment ids) are global
    # and replicated, as the ops take them there; the token-scan fallback (a row of more
    # documents than docs_per_row) stays under XLA's automatic sharding: exact, not parallel.
    rows_fn = (over_context(lambda cu, *xs: jax.vmap(row)(cu, *xs),
                            (REPLICATED,) + (TOKENS,) * len(args), TOKENS) if cp else row)
    return packed_or_scanned(rows, rows_fn,
                             lambda a: restarting_scan(step_op, a, rows.starts, **kw), args,
                             batched=cp)


# ------------------------------------------------------------------------ context parallelism
# The mesh axis that splits the sequence (configs/base.py MESH_AXES; layers never import configs).
CONTEXT_AXIS = "context"
# shard_map specs: [B, T, ...] arrays split over T; arrays every device holds whole.
TOKENS = jax.sharding.PartitionSpec(None, CONTEXT_AXIS)
REPLICATED = jax.sharding.PartitionSpec()


def context_size(T: Optional[int] = None) -> int:
    """D, the devices that split T in this full forward: the size of the `context` axis of the
    mesh being traced under (`jax.set_mesh`, as the trainer does). 1 without a mesh or that
    axis, inside a shard_map already manual over it, or when T (if given) does not split into
    D equal slices: the layer then runs as on one device and XLA's automatic sharding keeps the
    result exact (for arbitrary T, e.g. a library caller's, not the trainer's: its seq_len is
    checked to split).

    Layers with `Mechanism.context_parallel` run their sequence-mixing ops inside
    `over_context` when this is > 1 (the full forward only: decoding with a cache never
    splits T); everything else in the model (projections, norms, MLPs, the loss) is per token
    and stays under XLA's automatic sharding with the activations' `length` logical axis on
    `context`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or CONTEXT_AXIS in mesh.manual_axes:
        return 1
    D = int(mesh.shape[CONTEXT_AXIS])
    return 1 if T is not None and T % D else D


def over_context(fn: Callable, in_specs, out_specs) -> Callable:
    """`fn` under `jax.shard_map` manual over the context axis only (data, fsdp and tensor stay
    automatic, so the batch and head shardings carry through unchanged). Specs: `TOKENS` for
    [B, T, ...] arrays split contiguously over T (device d holds tokens [d·T/D, (d+1)·T/D)),
    `REPLICATED` for what every device needs whole (parameters, global cu_seqlens); a spec
    may stand for a whole subtree, None leaves included. Inside, `CONTEXT_AXIS` is bound: the
    ops take `context_axis=CONTEXT_AXIS`. check_vma=False: Pallas' interpret mode (impl
    "pallas" on CPU) cannot run under JAX's replication checks; gradients of replicated inputs
    are still summed over the axis."""
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                         out_specs=out_specs, axis_names=frozenset({CONTEXT_AXIS}),
                         check_vma=False)


def context_halo(x: jax.Array, n: int, fill=0) -> jax.Array:
    """Inside `over_context`: [B, n, ...], the n tokens just before this device's slice x
    [B, T, ...] (the previous devices' last tokens), `fill` before the sequence start (device
    0). One `ppermute` of n tokens when n <= T (short convolutions, sliding windows up to a
    slice); an all-gather otherwise."""
    T = x.shape[1]
    if n == 0:
        return x[:, :0]
    D = jax.lax.axis_size(CONTEXT_AXIS)
    d = jax.lax.axis_index(CONTEXT_AXIS)
    if n <= T:
        prev = jax.lax.ppermute(x[:, T - n:], CONTEXT_AXIS, [(i, i + 1) for i in range(D - 1)])
        return jnp.where(d == 0, jnp.full_like(prev, fill), prev)
    full = jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)
    full = jnp.pad(full, [(0, 0), (n, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jax.lax.dynamic_slice_in_dim(full, d * T, n, axis=1)


def context_attention(attend: Callable, q, kv: tuple, doc_ids=None, *, window=None,
                      replicated=()):
    """Causal softmax attention of the full forward with T split over the context axis.

    attend(q, *kv, *replicated, segment_ids=, kv_segment_ids=, q_positions=, kv_positions=)
    -> o is the attention op (positions are global token indices) on this device's T/D
    queries and the keys they can see:
      * a window W with W − 1 <= T/D (sliding-window attention): the previous device's last
        W − 1 keys/values (`context_halo`, one ppermute) before its own; device 0's are empty
        slots (position −1);
      * otherwise (full causal attention, or a window longer than a slice): every key/value,
        all-gathered over the axis. Each device then holds the whole sequence's K/V (not its
        queries, scores or outputs): right while the K/V of a sequence fit one device, which
        is what the all-gather needs; ring attention (K/V blocks passed round with ppermute,
        an online softmax) is the scalable alternative, not built.
    kv: the [B, T, ...] arrays the keys come from (exchanged as they are: pass the smallest
    form, e.g. MLA's latents, and expand inside `attend`); doc_ids [B, T] (document ids,
    `document_ids`) or None; replicated: parameters `attend` takes (sinks, prefix keys)."""

    def local(q, kv, doc, rep):
        T = q.shape[1]
        D = jax.lax.axis_size(CONTEXT_AXIS)
        d = jax.lax.axis_index(CONTEXT_AXIS)
        q_pos = d * T + jnp.arange(T, dtype=jnp.int32)
        if window is not None and window - 1 <= T:
            n = window - 1
            kv = tuple(jnp.concatenate([context_halo(x, n), x], axis=1) for x in kv)
            kv_pos = d * T - n + jnp.arange(T + n, dtype=jnp.int32)
            kv_pos = jnp.where(kv_pos < 0, -1, kv_pos)
            kv_doc = None if doc is None else jnp.concatenate(
                [context_halo(doc, n, fill=-1), doc], axis=1)
        else:
            kv = tuple(jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True) for x in kv)
            kv_pos = jnp.arange(D * T, dtype=jnp.int32)
            kv_doc = None if doc is None else jax.lax.all_gather(doc, CONTEXT_AXIS, axis=1,
                                                                 tiled=True)
        return attend(q, *kv, *rep, segment_ids=doc, kv_segment_ids=kv_doc, q_positions=q_pos,
                      kv_positions=kv_pos)

    return over_context(local, (TOKENS, TOKENS, TOKENS, REPLICATED), TOKENS)(
        q, tuple(kv), doc_ids, tuple(replicated))
