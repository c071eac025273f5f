"""Causal depthwise short convolution (width 4 by default) with its own decode cache.

y_t = act(Σ_{i<W} w_i · x_{t-W+1+i} (+ b)) over each channel (the bias b, zero at init, only
with `use_bias`: Mamba2's conv1d has one). Inputs of an earlier document (one that
ended where the segment id last changed) count as zeros, so nothing leaks across packed
documents. The cache is the last W−1 inputs [B, W−1, *channels]; `init_cache` makes an empty
one. With T split over a mesh's context axis (`layers.common.context_size` > 1, the full
forward), each device takes the W−1 inputs before its slice from the previous device (one
ppermute, `context_halo`). The kernel starts N(0, std²) (std = the model's init_std, 0.02 by
default), as fla's models re-initialise every Conv1d, its ShortConvolution included
(`_init_weights`); PyTorch's own default, uniform ±1/√W, has a standard deviation 14× that at
W = 4.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (REPLICATED, TOKENS, context_halo, context_size, document_ids,
                           init, over_context)
from layers.registry import Setting


def init_cache(batch: int, channels: Sequence[int], width: int, dtype) -> jax.Array:
    return jnp.zeros((batch, width - 1) + tuple(channels), dtype)


class ShortConv(nn.Module):
    width: int = 4
    activation: bool = True
    axes: tuple = ("heads", "kv")
    dtype: jnp.dtype = jnp.float32
    std: float = 0.02
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, segment_ids=None, cache: Optional[jax.Array] = None):
        B, T = x.shape[:2]
        C = x.shape[2:]
        W = self.width
        w = self.param("kernel", init(self.std, (None,) + tuple(self.axes)), (W,) + C,
                       jnp.float32)
        x = x.astype(self.dtype)
        doc = None if segment_ids is None else document_ids(segment_ids)
        if cache is None and context_size(T) > 1:
            # T split over the mesh's context axis: each device's slice needs the W − 1 inputs
            # (and document ids) before it, the previous device's last ones (zeros and no
            # document before the sequence start).
            def local(x, doc, w):
                xp = jnp.concatenate([context_halo(x, W - 1), x], axis=1)
                sp = None if doc is None else jnp.concatenate(
                    [context_halo(doc, W - 1, fill=-1), doc], axis=1)
                return _causal_conv(xp, sp, doc, w)
            y = over_context(local, (TOKENS, TOKENS, REPLICATED), TOKENS)(x, doc, w)
        else:
            if cache is None:
                xp = jnp.pad(x, [(0, 0), (W - 1, 0)] + [(0, 0)] * len(C))
            else:
                xp = jnp.concatenate([cache.astype(self.dtype), x], axis=1)
            sp = None if doc is None else jnp.pad(doc, ((0, 0), (W - 1, 0)), constant_values=-1)
            y = _causal_conv(xp, sp, doc, w)
        if self.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                    tuple(self.axes)),
                               C, jnp.float32)
        if self.activation:
            y = jax.nn.silu(y)
        new_cache = None if cache is None else xp[:, -(W - 1):]
        return y.astype(self.dtype), new_cache


def _causal_conv(xp, sp, doc, w):
    """Σ_i w_i · x_{t-W+1+i} in float32 from xp [B, W−1+T, *C] (the W − 1 inputs before the
    T outputs' first, then theirs); a term from another document is dropped when doc [B, T]
    (with sp [B, W−1+T], the document ids of xp) is given."""
    W = w.shape[0]
    T = xp.shape[1] - (W - 1)
    nc = xp.ndim - 2
    y = jnp.zeros(xp[:, W - 1:].shape, jnp.float32)
    for i in range(W):
        term = xp[:, i:i + T].astype(jnp.float32) * w[i]
        if doc is not None and i < W - 1:
            same = sp[:, i:i + T] == doc
            term = term * same.reshape(same.shape + (1,) * nc)
        y = y + term
    return y


def qkv_conv_cache(batch: int, channels: dict, width: int, dtype) -> dict:
    """Empty caches of `short_conv_qkv`: {"conv_q": ..., ...} for channels {"q": (H, D), ...}."""
    return {f"conv_{n}": init_cache(batch, c, width, dtype) for n, c in channels.items()}


def short_conv_qkv(tensors: dict, width: int, segment_ids, cache: Optional[dict], dtype,
                   axes: Optional[dict] = None, std: float = 0.02, use_bias: bool = False):
    """SiLU(short conv) of each named tensor ({"q": q, "k": k, "v": v}), through submodules
    `{name}_conv` of the calling (compact) module; `axes` {name: logical axes of the channels}
    where a tensor's channels are not ("heads", "kv"); `std` the kernels' init (the caller's
    init_std); `use_bias` a bias before the SiLU. Returns (the outputs by name, the updated cache entries `conv_{name}`: empty
    without a cache)."""
    outs, new_cache = {}, {}
    for n, t in tensors.items():
        c = None if cache is None else cache[f"conv_{n}"]
        ax = (axes or {}).get(n, ("heads", "kv"))
        outs[n], c = ShortConv(width, axes=ax, dtype=dtype, std=std, use_bias=use_bias,
                               name=f"{n}_conv")(t, segment_ids, c)
        if cache is not None:
            new_cache[f"conv_{n}"] = c
    return outs, new_cache


def conv_settings(on: bool) -> dict:
    """The settings of a mechanism with optional q/k/v short convs (`on`: its default)."""
    return {
        "short_conv": Setting(on, bool, "SiLU(causal depthwise conv) on q, k, v"),
        "conv_size": Setting(4, int, "width of the short convs"),
    }
