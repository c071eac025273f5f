"""Small helpers every layer shares: logically-partitioned initialisers and dense layers,
segment-id bookkeeping for packed documents."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Log-gate that starts a new document inside a recurrent op: exp(-30) ≈ 1e-13 wipes the
# previous document's state without the -inf that would poison the chunked cumsums.
RESET_LOG_GATE = -30.0

AXIS_NAMES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "memory")


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

    @nn.compact
    def __call__(self, x):
        axis = tuple(a % x.ndim for a in self.axis)
        kernel = self.param("kernel", init(self.std, self.axes),
                            tuple(x.shape[a] for a in axis) + self.features, jnp.float32)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), (axis, tuple(range(len(axis)))))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[-len(self.features):]), self.features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def dense(features, axes, *, std, dtype, axis=-1, name=None, use_bias=False):
    """A `Dense` whose kernel carries logical axis names `axes` (input dims first)."""
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return Dense(as_tuple(features), tuple(axes), std, dtype, as_tuple(axis), use_bias, name=name)


def constrain(x, axes):
    return nn.with_logical_constraint(x, tuple(axes))


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: the token begins a document (its id differs from the previous token's)."""
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return segment_ids != prev


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: position of each token inside its document."""
    T = segment_ids.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None]
    start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)
    return t - start


def reset_gate(g: Optional[jax.Array], segment_ids: Optional[jax.Array], shape):
    """Add the document-reset log-gate to a per-head log gate g [B, T, H] (None = no decay)."""
    if segment_ids is None:
        return g
    reset = jnp.where(segment_starts(segment_ids), RESET_LOG_GATE, 0.0)
    reset = jnp.broadcast_to(reset[:, :, None], shape).astype(jnp.float32)
    return reset if g is None else g + reset


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


def step_or_chunk(op, step_op, *args, state, **kw):
    """Run a recurrent op over [B, T, ...] inputs (args; None allowed) for the three modes:
    training (state None), one decode token (T == 1: the O(1) `step_op`), a prefill/chunk
    from a cached state. Returns (o [B, T, H, V], new state or None)."""
    chunk_kw = {k: kw.pop(k) for k in ("impl", "chunk_size")}
    if state is None:
        o, _ = op(*args, **kw, **chunk_kw)
        return o, None
    if args[0].shape[1] == 1:
        o, new = step_op(*(None if a is None else a[:, 0] for a in args), state=state, **kw)
        return o[:, None], new
    return op(*args, initial_state=state, output_final_state=True, **kw, **chunk_kw)
