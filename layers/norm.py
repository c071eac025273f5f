"""RMSNorm, and the gated RMSNorm that recurrent mixers put on their per-head outputs."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _rms(x, eps):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """y = x / rms(x) · scale over the last axis (computed in float32). `zero_centred`
    (Qwen3-Next's norms, Gemma's): y = x / rms(x) · (1 + scale), the stored `scale` starting at
    0, so that weight decay pulls it towards the identity; the parameter is then the offset
    from 1, exactly what such a checkpoint stores."""
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"
    zero_centred: bool = False

    @nn.compact
    def __call__(self, x):
        fill = nn.initializers.zeros if self.zero_centred else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(fill, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        return (_rms(x, self.eps) * (1.0 + scale if self.zero_centred else scale)
                ).astype(self.dtype)


class GatedRMSNorm(nn.Module):
    """y = RMSNorm(o) · act(gate), per head over the last axis, act SiLU (the GDN output norm)
    or sigmoid (KDA's: fla's FusedRMSNormGated with activation 'sigmoid'); Mamba2 gates first
    and normalises over groups of heads: layers/ssd.py GroupGatedRMSNorm."""
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "kv"
    activation: str = "silu"    # "silu" | "sigmoid"

    @nn.compact
    def __call__(self, x, gate=None):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        y = _rms(x, self.eps) * scale
        if gate is not None:
            act = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}[self.activation]
            y = y * act(gate.astype(jnp.float32))
        return y.astype(self.dtype)
