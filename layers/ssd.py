"""`ssd`: Mamba2's layer (state-spaces/mamba `mamba_ssm/modules/mamba2.py`; the same function as
transformers' `Mamba2Mixer` and fla's `Mamba2`) on `pallas_kernels.linear_attention`.

With H heads of width P (the model's num_heads and head_dim, so the inner width H·P is Mamba2's
expand · d_model), G groups (`ngroups`) and state width N (`d_state`):

  z, x [H, P], B, C [G, N], dt_raw [H]   projections of the input (Mamba2's in_proj, split)
  x, B, C = SiLU(conv4(·) + bias)        causal depthwise conv over x, B, C (Mamba2's conv1d)
  dt = softplus(dt_raw + dt_bias),  A = −exp(A_log)
  S_t = exp(dt_t·A) S_{t−1} + dt_t · B_t x_tᵀ,  o_t = S_tᵀ C_t + D ⊙ x_t    per head, state [N, P]
  y = o_proj(RMSNorm_group(o ⊙ SiLU(z)))    gate, then normalise over each group's H/G·P channels
                                            (RMSNormGated with norm_before_gate=False)

B and C are shared by the H/G heads of a group; the op takes one head count, so they are
repeated to H heads (q = C, k = dt·B, v = x, g = dt·A, scale 1). A ~ U(1, 16), dt log-uniform in
[1e-3, 0.1], D = 1 (Mamba2's init); the conv kernels start N(0, init_std²) and their biases at
0, as fla's Mamba2 initialises its conv1d (mamba_ssm keeps PyTorch's uniform ±1/√W for both).
`short_conv=False` replaces the conv by the SiLU alone (an ablation; Mamba2 always has it). The
decode cache is the [B, H, N, P] float32 state and the last conv_size − 1 inputs of x, B and C.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (a_log_init, constrain, dense, dt_bias_init, head_param,
                           project_out_with_state, step_or_chunk)
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.norm import _rms
from layers.registry import Mechanism, Setting, SettingError, Shared, positive_int, register
from pallas_kernels.linear_attention import linear_attention, linear_attention_step

# Logical axes of the channels of each conv input: x per head, B and C per group (groups are
# few, often one, so they stay unsharded).
_AXES = {"x": ("heads", "kv"), "B": (None, "kv"), "C": (None, "kv")}


class GroupGatedRMSNorm(nn.Module):
    """y = RMSNorm(o ⊙ SiLU(z)) · scale, the mean square taken over each of `groups` groups of
    heads together ([H, P] -> G groups of H/G·P channels): Mamba2's RMSNormGated with
    norm_before_gate=False and group_size = H·P / ngroups."""
    groups: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, o, z):
        B, T, H, P = o.shape
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("heads", "kv")),
                           (H, P), jnp.float32)
        y = o.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        y = _rms(y.reshape(B, T, self.groups, -1), self.eps).reshape(B, T, H, P)
        return (y * scale).astype(self.dtype)


class SSD(nn.Module):
    d_model: int
    num_heads: int
    head_dim: int
    d_state: int = 128
    ngroups: int = 1
    conv_size: int = 4
    use_short_conv: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    chunk_size: int = 64

    def _channels(self) -> dict:
        G, N = self.ngroups, self.d_state
        return {"x": (self.num_heads, self.head_dim), "B": (G, N), "C": (G, N)}

    def init_cache(self, batch: int, max_len: int) -> dict:
        cache = {"state": jnp.zeros((batch, self.num_heads, self.d_state, self.head_dim),
                                    jnp.float32)}
        if self.use_short_conv:
            cache.update(qkv_conv_cache(batch, self._channels(), self.conv_size, self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        H, P, G = self.num_heads, self.head_dim, self.ngroups
        kw = dict(std=self.init_std, dtype=self.dtype)
        z = dense((H, P), ("embed", "heads", "kv"), name="z_proj", **kw)(x)
        xbc = {n: dense(c, ("embed",) + _AXES[n], name=f"{n}_proj", **kw)(x)
               for n, c in self._channels().items()}
        if self.use_short_conv:
            xbc, new_cache = short_conv_qkv(xbc, self.conv_size, segment_ids, cache, self.dtype,
                                            axes=_AXES, std=self.init_std, use_bias=True)
        else:   # the activation the conv path ends with
            xbc, new_cache = {n: jax.nn.silu(t) for n, t in xbc.items()}, {}
        xs = xbc["x"]
        dt = dense((H,), ("embed", "heads"), name="dt_proj", **kw)(x).astype(jnp.float32)
        dt = jax.nn.softplus(dt + head_param(self, "dt_bias", dt_bias_init, H))
        g = -jnp.exp(head_param(self, "A_log", a_log_init, H)) * dt
        q = jnp.repeat(xbc["C"], H // G, axis=2)
        k = (jnp.repeat(xbc["B"], H // G, axis=2).astype(jnp.float32)
             * dt[..., None]).astype(self.dtype)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        k = constrain(k, ("batch", "length", "heads", "kv"))
        o, state = step_or_chunk(linear_attention, linear_attention_step, q, k, xs, g, None,
                                 scale=1.0, state=None if cache is None else cache["state"],
                                 segment_ids=segment_ids, impl=self.impl,
                                 chunk_size=self.chunk_size)
        d_skip = head_param(self, "D", nn.initializers.ones, H)
        o = o.astype(jnp.float32) + xs.astype(jnp.float32) * d_skip[:, None]
        o = GroupGatedRMSNorm(G, self.norm_eps, self.dtype, name="o_norm")(o, z)
        return project_out_with_state(o, self.d_model, state, cache, new_cache, **kw)


_SETTINGS = {
    "d_state": Setting(128, int, "state width N per head (Mamba2's d_state)"),
    "ngroups": Setting(1, int, "groups of heads sharing B and C, and the output norm's groups "
                               "(Mamba2's ngroups); must divide num_heads"),
    **conv_settings(True),
}


def _check(shared: Shared, s) -> None:
    positive_int(s, "d_state", "ngroups", "conv_size")
    if shared.num_heads % s["ngroups"]:
        raise SettingError("ngroups", f"must divide num_heads = {shared.num_heads}, "
                                      f"got {s['ngroups']}")


def _build(shared: Shared, s, name):
    return SSD(d_model=shared.d_model, num_heads=shared.num_heads, head_dim=shared.head_dim,
               d_state=s["d_state"], ngroups=s["ngroups"], conv_size=s["conv_size"],
               use_short_conv=s["short_conv"], norm_eps=shared.norm_eps,
               init_std=shared.init_std, dtype=shared.dtype, impl=shared.impl,
               chunk_size=shared.chunk_size, name=name)


register(Mechanism("ssd", "token", _build, _SETTINGS, _check,
                   "Mamba2: scalar data-dependent decay, B/C shared per group, gated group "
                   "norm", recurrent=True, context_parallel=True))
