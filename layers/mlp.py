"""Channel mixers for the MLP slot of a block: SwiGLU, wo(SiLU(x·w_gate) ⊙ x·w_up), and none."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import constrain, dense
from layers.registry import (MAX_INT, Mechanism, Setting, SettingError, Shared, positive_int,
                             register)


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


def _d_ff(shared: Shared, s) -> int:
    if s["d_ff"] is not None:
        return s["d_ff"]
    return -(-int(math.ceil(s["mlp_ratio"] * shared.d_model)) // 8) * 8


def _check(shared: Shared, s) -> None:
    positive_int(s, "d_ff")
    if not s["mlp_ratio"] > 0:
        raise SettingError("mlp_ratio", f"must be > 0, got {s['mlp_ratio']}")
    if s["d_ff"] is None and not s["mlp_ratio"] * shared.d_model <= MAX_INT - 8:
        raise SettingError("mlp_ratio", f"the d_ff it gives, mlp_ratio · d_model "
                                        f"({shared.d_model}) rounded up to 8, must be "
                                        f"<= 2**31 - 1, got {s['mlp_ratio']}")


register(Mechanism(
    "swiglu", "channel",
    lambda shared, s, name: SwiGLU(shared.d_model, _d_ff(shared, s), shared.init_std,
                                   shared.dtype, name=name),
    {"mlp_ratio": Setting(8 / 3, float, "hidden = round_up(mlp_ratio · d_model, 8)"),
     "d_ff": Setting(None, int, "hidden width; overrides mlp_ratio", optional=True)},
    _check, "SwiGLU MLP"))
register(Mechanism("none", "channel", lambda shared, s, name: None,
                   summary="no channel mixer (mixer-only blocks, as Zoology's MQAR models)"))
