"""SwiGLU MLP: wo(SiLU(x·w_gate) ⊙ x·w_up)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import constrain, dense


class SwiGLU(nn.Module):
    d_model: int
    d_ff: int
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(std=self.init_std, dtype=self.dtype)
        gate = dense(self.d_ff, ("embed", "mlp"), name="w_gate", **kw)(x)
        up = dense(self.d_ff, ("embed", "mlp"), name="w_up", **kw)(x)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(self.d_model, ("mlp", "embed"), name="w_out", **kw)(h)
