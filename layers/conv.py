"""Causal depthwise short convolution (width 4 by default) with its own decode cache.

y_t = act(Σ_{i<W} w_i · x_{t-W+1+i}) over each channel. Inputs of an earlier document (other
segment id) count as zeros, so nothing leaks across packed documents. The cache is the last
W−1 inputs [B, W−1, *channels]; `init_cache` makes an empty one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_cache(batch: int, channels: Sequence[int], width: int, dtype) -> jax.Array:
    return jnp.zeros((batch, width - 1) + tuple(channels), dtype)


class ShortConv(nn.Module):
    width: int = 4
    activation: bool = True
    axes: tuple = ("heads", "kv")
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, segment_ids=None, cache: Optional[jax.Array] = None):
        B, T = x.shape[:2]
        C = x.shape[2:]
        W = self.width
        bound = 1.0 / W ** 0.5   # PyTorch's Conv1d default for a depthwise conv (fan_in = W)

        def uniform(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        w = self.param("kernel", nn.with_logical_partitioning(uniform, (None,) + tuple(self.axes)),
                       (W,) + C, jnp.float32)
        x = x.astype(self.dtype)
        if cache is None:
            xp = jnp.pad(x, [(0, 0), (W - 1, 0)] + [(0, 0)] * len(C))
        else:
            xp = jnp.concatenate([cache.astype(self.dtype), x], axis=1)
        if segment_ids is not None:
            sp = jnp.pad(segment_ids, ((0, 0), (W - 1, 0)), constant_values=-1)
        y = jnp.zeros(x.shape, jnp.float32)
        for i in range(W):
            term = xp[:, i:i + T].astype(jnp.float32) * w[i]
            if segment_ids is not None and i < W - 1:
                same = sp[:, i:i + T] == segment_ids
                term = term * same.reshape(same.shape + (1,) * len(C))
            y = y + term
        if self.activation:
            y = jax.nn.silu(y)
        new_cache = None if cache is None else xp[:, -(W - 1):]
        return y.astype(self.dtype), new_cache
