"""Pieces every op family shares: input checks, impl selection, dtype policy, and the
mapping of (packed) sequences onto fixed-size chunks.

Only jax and numpy are imported here, so any JAX project can use the ops without Flax.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import operator
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

IMPLS = ("auto", "reference", "xla", "pallas")


# ----------------------------------------------------------------------------- checks
INPUT_CONTRACT = """What the recurrent ops (linear_attention, gated_delta_rule, their _step) accept.

Arrays (q, k, v, gates, beta, initial_state / state, cu_seqlens) may be JAX arrays, traced or
not, NumPy arrays, or anything NumPy reads as an array of numbers (nested lists); eager or
under jit. What is static is checked before anything is computed or compiled, and a bad value
is a ValueError naming the argument and the shapes: ranks and shapes; a floating dtype
(float16, bfloat16, float32; float64 under x64) for every array but cu_seqlens, which is an
integer array [N+1] with N >= 1 and B == 1; H, K, V >= 1 (B or T may be 0: o is then empty
and every sequence keeps its initial state); `scale` a finite real number (a Python or NumPy
scalar: it is static); `chunk_size` a positive power of two (Python or NumPy integer);
`impl` one of the names; flags bool. The arrays are then converted with `jnp.asarray` (so
float64 NumPy input computes in float32 unless x64 is enabled); dtypes may be mixed; the
state and the accumulation are float32 (float64 for float64 q) and o has q's dtype.

Values are not checked: they may be traced, and a check of concrete ones would cost a device
round trip per call. The one exception is a concrete (not traced) `cu_seqlens`, which must
satisfy 0 = cu[0] <= cu[1] <= ... <= cu[N] <= T (ValueError otherwise); traced offsets are
trusted, and traced offsets outside that contract give unspecified outputs (no error).

- Gates are natural-log decays and are meant to be <= 0. A finite positive gate is not an
  error: it is computed as written (the state grows by exp(g)), and every impl agrees while
  the values stay within the float range.
- Non-finite inputs (NaN or +-inf in a gate, beta, q, k, v or the state) are not an error
  either: the call returns, and they propagate to the outputs and final state of the one
  sequence that holds them (a batch row, or a packed sequence of cu_seqlens) -- never to
  another sequence. Which positions of that sequence turn non-finite depends on the impl (the
  chunked forms may spread it over the chunk holding the token, earlier tokens included); a
  NaN gate makes the sequence's final state NaN. A gate of -inf is therefore not a hard reset
  (the chunked forms turn it into NaN): mark boundaries with cu_seqlens, or use a finite
  gate such as -30.
"""

# The ops' public entry points turn their array arguments into checkable arrays
# (`as_input`), check what is static, then convert them to JAX arrays (`to_jax`), so the
# impls below only ever see JAX arrays.

def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else repr(x)[:80]


def as_input(name: str, x, allow_none: bool = False):
    """An op argument as an array whose shape and dtype can be checked.

    JAX arrays (tracers included), NumPy arrays and shape/dtype stand-ins
    (`jax.ShapeDtypeStruct`) pass through unchanged; anything else NumPy can turn into an
    array of numbers (Python scalars, NumPy scalars, nested lists) is converted with
    `np.asarray`. None passes when `allow_none`. Anything else: ValueError naming `name`.
    """
    if x is None:
        if allow_none:
            return None
        raise ValueError(f"`{name}` is required, got None")
    if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return x
    try:
        arr = np.asarray(x)
    except jax.errors.TracerArrayConversionError:  # e.g. a list holding traced scalars
        try:
            return jnp.asarray(x)
        except Exception as e:
            raise ValueError(f"`{name}` must be an array (JAX or NumPy), got {_describe(x)}: "
                             f"{e}") from None
    except Exception as e:  # ragged lists, objects NumPy cannot read
        raise ValueError(f"`{name}` must be an array (JAX or NumPy), got {_describe(x)}: "
                         f"{e}") from None
    if arr.dtype == object:
        raise ValueError(f"`{name}` must be an array of numbers, got {_describe(x)}")
    return arr


def as_inputs(optional: Sequence[str], **arrays) -> tuple:
    """`as_input` of each named array argument, in order; those named in `optional` may be
    None."""
    return tuple(as_input(name, x, allow_none=name in optional) for name, x in arrays.items())


def to_jax(*xs) -> tuple:
    """Each validated input as a JAX array (None stays None); tracers pass through."""
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


def _dtype_is(x, kind) -> bool:
    try:
        return bool(jnp.issubdtype(x.dtype, kind))
    except (TypeError, AttributeError):
        return False


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


def check_qkv(q, k, v, *, step: bool = False) -> tuple[int, ...]:
    """Check the `[B, T, H, D]` layout of q, k, v; return (B, T, H, K, V).

    With `step=True` (single-token decoding) the layout is `[B, H, D]` and (B, H, K, V) is
    returned. B and T may be 0 (an empty batch or sequence); H, K and V must be at least 1.
    """
    rank, layout = (3, "[B, H, {}]") if step else (4, "[B, T, H, {}]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, rank)
    check_shape("k", k, q.shape, f"must match q {layout.format('K')}")
    if v.shape[:-1] != q.shape[:-1]:
        expected = q.shape[:-1] + ("V",)
        raise ValueError(
            f"`v` must have shape {layout.format('V')} = {expected} to match q {q.shape}, "
            f"got {v.shape}")
    if min(q.shape[-2:]) < 1:
        raise ValueError(f"`q` must have H >= 1 and K >= 1 in {layout.format('K')}, "
                         f"got {q.shape}")
    if v.shape[-1] < 1:
        raise ValueError(f"`v` must have V >= 1 in {layout.format('V')}, got {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
    return tuple(q.shape) + (v.shape[-1],)


def check_float(name: str, x) -> None:
    if not _dtype_is(x, jnp.floating):
        raise ValueError(f"`{name}` must be floating point, got dtype {getattr(x, 'dtype', None)}")


def check_array(name: str, x, expected: Sequence[int], what: str,
                allow_none: bool = False) -> None:
    """Shape and floating-dtype check of an input such as a gate, β or a state."""
    if x is None and allow_none:
        return
    check_shape(name, x, expected, what)
    check_float(name, x)


def check_positive_int(name: str, x, power_of_two: bool = False) -> int:
    """A positive (power-of-two) Python or NumPy integer, not a bool; returned as an int."""
    value = None
    if not isinstance(x, (bool, np.bool_)):
        try:
            value = operator.index(x)
        except TypeError:
            pass
    if value is None or value < 1 or (power_of_two and value & (value - 1)):
        kind = "a positive power of two" if power_of_two else "a positive int"
        raise ValueError(f"`{name}` must be {kind}, got {x!r}")
    return value


def check_chunk_size(chunk_size) -> int:
    """A positive power of two (a Python or NumPy integer, not a bool); returned as an int."""
    return check_positive_int("chunk_size", chunk_size, power_of_two=True)


def check_scale(scale, K: int) -> float:
    """The read-out scale as a Python float: `K**-0.5` for None, else a finite real number
    (Python, NumPy or concrete 0-d JAX scalar). It is static (the kernels bake it in), so a
    traced scale is a ValueError."""
    if scale is None:
        return K ** -0.5
    if isinstance(scale, jax.core.Tracer):
        raise ValueError("`scale` must be a concrete number (Python or NumPy scalar), got a "
                         f"traced value {_describe(scale)}; pass it as a static argument")
    if isinstance(scale, (bool, np.bool_)):
        raise ValueError(f"`scale` must be a finite real number, got {scale!r}")
    try:
        arr = np.asarray(scale)
        ok = arr.shape == () and (_dtype_is(arr, jnp.floating) or _dtype_is(arr, jnp.integer))
        value = float(arr) if ok else None
    except Exception:
        ok = False
    if not ok or not math.isfinite(value):
        raise ValueError(f"`scale` must be a finite real number, got {_describe(scale)}")
    return value


def check_flag(name: str, x) -> bool:
    """A static boolean option (Python or NumPy bool, or 0 / 1)."""
    if isinstance(x, (bool, np.bool_)) or (isinstance(x, (int, np.integer)) and x in (0, 1)):
        return bool(x)
    raise ValueError(f"`{name}` must be a bool, got {_describe(x)}")


def check_cu_seqlens(cu_seqlens, batch: int, T: Optional[int] = None) -> Optional[int]:
    """Return the number N of packed sequences (None without cu_seqlens).

    Static checks always: rank 1, N >= 1, an integer dtype, B == 1. Values (0 = cu[0] <=
    cu[1] <= ... <= cu[N] <= T) only when cu_seqlens is concrete (not traced): under `jit`
    traced offsets are not checked, and offsets outside that contract give unspecified
    outputs (no error)."""
    if cu_seqlens is None:
        return None
    shape = check_rank("cu_seqlens", cu_seqlens, 1)
    if shape[0] < 2:
        raise ValueError(f"`cu_seqlens` must have shape [N+1] with N >= 1, got {shape}")
    if not _dtype_is(cu_seqlens, jnp.integer):
        raise ValueError(f"`cu_seqlens` must be an integer array, got dtype "
                         f"{getattr(cu_seqlens, 'dtype', None)}")
    if batch != 1:
        raise ValueError(f"`cu_seqlens` needs a batch of one packed row (B == 1), got B = {batch}")
    if T is not None and isinstance(cu_seqlens, (jax.Array, np.ndarray)) and not isinstance(
            cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens).astype(np.int64)
        if cu[0] != 0 or np.any(np.diff(cu) < 0) or cu[-1] > T:
            raise ValueError(f"`cu_seqlens` must start at 0, never decrease and end at most at "
                             f"T = {T}, got {cu.tolist()}")
    return shape[0] - 1


def check_initial_state(initial_state, num_states: int, H: int, K: int, V: int,
                        name: str = "initial_state") -> None:
    check_array(name, initial_state, (num_states, H, K, V),
                "[N, H, K, V] with N = number of sequences", allow_none=True)


# impl="auto" per platform: the impl `eval.bench_ops` measured fastest there (README,
# "Kernels"). GPU: on an H200 the Pallas kernels ran the gated delta rule 7.7x faster than the
# chunked XLA path (forward, B=4, T=4096, H=16, K=V=128, bf16). TPU: pallas, not yet measured
# on a TPU. Anywhere else (CPU): xla, since Pallas runs there only in interpret mode.
AUTO_IMPL = {"gpu": "pallas", "cuda": "pallas", "rocm": "pallas", "tpu": "pallas"}


def resolve_impl(impl: str, pallas_available: bool = True) -> str:
    """Map `impl` to a concrete path (`AUTO_IMPL` for 'auto', xla where it names none)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    choice = AUTO_IMPL.get(jax.default_backend(), "xla")
    return choice if choice != "pallas" or pallas_available else "xla"


def select_impl(package: str, op: str, impl: str, chunk_size: int) -> Callable:
    """The function computing `op` the `impl` way, imported lazily from the op's package.

    `package` is the op family's package (e.g. 'pallas_kernels.linear_attention'); the
    function is `{op}_{impl}` of its module `reference`, `xla` or `pallas`. The chunked forms
    (xla, pallas) get `chunk_size` bound; every one is then called as
    `fn(*arrays, scale=..., initial_state=..., cu_seqlens=...) -> (o, final_state)`.
    """
    has_pallas = importlib.util.find_spec(f"{package}.pallas") is not None
    impl = resolve_impl(impl, pallas_available=has_pallas)
    if impl == "pallas" and not has_pallas:
        raise NotImplementedError(
            f"impl='pallas' is not available for {op} yet (no module {package}.pallas); "
            "use impl='xla' or impl='reference'")
    fn = getattr(importlib.import_module(f"{package}.{impl}"), f"{op}_{impl}")
    return fn if impl == "reference" else functools.partial(fn, chunk_size=chunk_size)


def acc_dtype(x) -> jnp.dtype:
    """Accumulation / state dtype: float32, or float64 when the inputs are float64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def cast(dtype, *xs) -> tuple:
    """Each array cast to `dtype`; None stays None."""
    return tuple(None if x is None else x.astype(dtype) for x in xs)


def empty_result(q, shape: Sequence[int], num_states: int, initial_state) -> tuple:
    """(o, final state) of a call with no tokens (B == 0 or T == 0): o is zeros [B, T, H, V] in
    q's dtype and every sequence keeps its initial state (zeros without one), in acc_dtype."""
    B, T, H, K, V = shape
    acc = acc_dtype(q)
    state = (jnp.zeros((num_states, H, K, V), acc) if initial_state is None
             else initial_state.astype(acc))
    return jnp.zeros((B, T, H, V), q.dtype), state


def _vma(x) -> frozenset:
    """The mesh axes over which `x` varies inside `jax.shard_map` (replication typing: the
    aval's `vma`, `manual_axis_type.varying` in newer JAX); empty outside shard_map, with
    check_vma=False, or on a JAX without it."""
    try:
        aval = jax.typeof(x)
    except Exception:
        return frozenset()
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def match_vma(init, *refs):
    """`init` (a pytree, e.g. a scan's initial carry built from constants) marked as varying
    over every mesh axis that any array in `refs` varies over. Inside `jax.shard_map` with
    replication checks, a carry that starts replicated but meets per-device inputs in the
    body must start varying too; outside shard_map this returns `init` unchanged."""
    axes = frozenset().union(*(_vma(r) for r in jax.tree.leaves(refs)))
    if not axes:
        return init

    def cast(x):
        missing = tuple(a for a in axes if a not in _vma(x))
        if not missing:
            return x
        pcast = getattr(jax.lax, "pcast", None)
        return (pcast(x, missing, to="varying") if pcast is not None
                else jax.lax.pvary(x, missing))
    return jax.tree.map(cast, init)


def varying_call(call, out_shape, *args):
    """`call(out_shape, *args)` (a `pl.pallas_call` and its operands) inside `jax.shard_map`
    with replication checks: the output `ShapeDtypeStruct`s vary over every mesh axis any
    operand varies over (JAX asks a Pallas call's outputs to say how they vary:
    `manual_axis_type`, `vma` in older JAX). Outside shard_map it is the plain call.

    Pallas' interpret mode (CPU) does not support replication checks (JAX 0.10: its
    interpreter mixes its invariant grid indices with varying blocks, a "requires varying
    manual axes to match" error): there, run the op under `shard_map(..., check_vma=False)`.
    """
    axes = frozenset().union(*(_vma(a) for a in jax.tree.leaves(args)))
    if not axes:
        return call(out_shape, *args)
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    if "manual_axis_type" in params:
        mat = jax.sharding.ManualAxisType(varying=axes)
        kw = {"manual_axis_type": mat}
    else:
        kw = {"vma": axes}
    out_shape = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, **kw), out_shape,
        is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))
    return call(out_shape, *args)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x**2) + eps) over the last axis, computed in acc_dtype, returned in x's."""
    xf = x.astype(acc_dtype(x))
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


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


def token_scan(update: Callable, xs: tuple, state_shape: Sequence[int], dtype,
               initial_state=None, cu_seqlens=None) -> tuple[jax.Array, jax.Array]:
    """Run a single-token recurrence over the T axis, restarting at every sequence start.

    update(S, *x_t) -> (o_t, S): S [B, *state_shape], x_t the t-th token of each array of `xs`
    ([B, T, ...], None entries are passed through as None). Inputs are cast to `dtype`.
    Returns o [B, T, ...] in `dtype` (zero for tokens past cu_seqlens[-1]) and the final
    state of each sequence [N, *state_shape] (an empty sequence keeps its initial state).
    """
    B, T = xs[0].shape[:2]
    layout = token_layout(B, T, cu_seqlens)
    N = layout.num_seqs
    init = (jnp.zeros((N,) + tuple(state_shape), dtype) if initial_state is None
            else initial_state.astype(dtype))
    xs = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in cast(dtype, *xs))
    varlen = cu_seqlens is not None
    mask = (slice(None),) + (None,) * len(state_shape)

    def body(carry, inp):
        S, final = carry
        x, is_start, seq = inp
        if varlen:  # reload the state where a sequence starts
            S = jnp.where(is_start[mask], init[jnp.minimum(seq, N - 1)], S)
        o, S = update(S, *x)
        if varlen:  # tokens past the last sequence give 0; a sequence's last write wins
            o = jnp.where((seq < N)[(slice(None),) + (None,) * (o.ndim - 1)], o, 0)
            final = final.at[seq].set(S, mode="drop")
        return (S, final), o

    S0 = jnp.zeros((B,) + tuple(state_shape), dtype) if varlen else init
    carry = match_vma((S0, init if varlen else None), xs, init, layout.is_start, layout.seq)
    (S, final), o = jax.lax.scan(body, carry, (xs, layout.is_start.T, layout.seq.T))
    return jnp.moveaxis(o, 0, 1), final if varlen else S


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

    def final_states(self, states_after: jax.Array, h0: Optional[jax.Array]) -> jax.Array:
        """Final state of each sequence, [N, H, K, V], from the states after each chunk."""
        if self.last_chunk is None:
            return states_after[:, -1]
        final = states_after[0, jnp.maximum(self.last_chunk, 0)]
        init = jnp.zeros_like(final) if h0 is None else h0.astype(final.dtype)
        return jnp.where(self.empty[:, None, None, None], init, final)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def fitted_chunk(chunk_size: int, T: int) -> int:
    """The chunk a T-token call runs with: `chunk_size`, or the power of two that covers T
    when that is smaller. The chunked ops compute the same function at any chunk size; a chunk
    far longer than the input would only pad it (and at 2^30 overflow int32 offsets)."""
    return min(chunk_size, 1 << max(T - 1, 0).bit_length())


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


# ----------------------------------------------------------------------------- Pallas platform
def default_backend() -> str:
    """'tpu' or 'gpu' kernel layout for the current default device ('tpu' layout on CPU)."""
    plat = jax.default_backend()
    return "gpu" if plat in ("gpu", "cuda", "rocm") else "tpu"


def default_interpret() -> bool:
    """Interpret mode unless a TPU or GPU is the default device."""
    return jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")


def div(a, n):
    """a // n for non-negative integer a (plain truncating division: Mosaic lowers `//` on
    signed ints through `sign`, which needs a TPU to be present)."""
    return lax.div(a, jnp.asarray(n, jnp.asarray(a).dtype))


def rem(a, n):
    return lax.rem(a, jnp.asarray(n, jnp.asarray(a).dtype))
