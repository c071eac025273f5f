"""Gated DeltaNet (`gdn`) and DeltaNet (`deltanet`) on `pallas_kernels.gated_delta_rule`,
as in the Gated DeltaNet reference code (fla's GatedDeltaNet layer):

  q, k, v = SiLU(conv4(W_q x)), SiLU(conv4(W_k x)), SiLU(conv4(W_v x))   (causal depthwise;
  SiLU(W x) when use_short_conv is False)
  q, k L2-normalised per head (inside the op); β = sigmoid(W_β x)  (2·sigmoid with
  allow_neg_eigval, eigenvalues of I − βkkᵀ in [−1, 1]);
  g = −exp(A_log) · softplus(W_a x + dt_bias), A ~ U(1, 16), dt log-uniform in [1e-3, 0.1]
  (Mamba2 init); DeltaNet has no decay (g = 0);
  y = o_proj(RMSNorm(o) ⊙ SiLU(W_g x)) per head (o_proj(RMSNorm(o)) without use_gate). Value
  heads are expand_v × head_dim wide; with num_v_heads = Hv > H (grouped value heads, as fla's
  GVA) value head j reads query/key head j // (Hv / H), and β, the decay, the gate and the
  state are per value head.

Decode cache: the [B, Hv, K, V] float32 state and the last conv_size − 1 inputs of each conv
(when there are convs).

Kimi Delta Attention (`layers/kda.py`) is this layer with another `decay` (per key) and
`output_gate` (low rank, sigmoid).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (a_log_init, constrain, dense, dt_bias_init, head_param,
                           project_out_with_state, step_or_chunk)
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.norm import GatedRMSNorm
from layers.registry import (Mechanism, Setting, SettingError, Shared, positive_int, register,
                             width_multiplier)
from pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step


class GatedDeltaNet(nn.Module):
    d_model: int
    num_heads: int
    head_dim: int
    expand_v: float = 1.0
    use_decay: bool = True           # False: DeltaNet
    allow_neg_eigval: bool = False
    num_v_heads: Optional[int] = None   # None: num_heads
    use_gate: bool = True
    conv_size: int = 4
    use_short_conv: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    chunk_size: int = 64

    @property
    def value_dim(self) -> int:
        return int(round(self.head_dim * self.expand_v))

    @property
    def value_heads(self) -> int:
        return self.num_v_heads or self.num_heads

    def init_cache(self, batch: int, max_len: int) -> dict:
        H, Hv, K, V = self.num_heads, self.value_heads, self.head_dim, self.value_dim
        cache = {"state": jnp.zeros((batch, Hv, K, V), jnp.float32)}
        if self.use_short_conv:
            cache.update(qkv_conv_cache(batch, {"q": (H, K), "k": (H, K), "v": (Hv, V)},
                                        self.conv_size, self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        H, Hv, K, V = self.num_heads, self.value_heads, self.head_dim, self.value_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        qkv = {n: dense((h, d), ("embed", "heads", "kv"), name=f"{n}_proj", **kw)(x)
               for n, h, d in (("q", H, K), ("k", H, K), ("v", Hv, V))}
        if self.use_short_conv:
            qkv, new_cache = short_conv_qkv(qkv, self.conv_size, segment_ids, cache, self.dtype,
                                            std=self.init_std)
        else:   # the activation the conv path ends with (as flash-linear-attention does)
            qkv, new_cache = {n: jax.nn.silu(t) for n, t in qkv.items()}, {}
        if Hv != H:   # the op takes one head count: each q/k head serves Hv / H value heads
            qkv["q"], qkv["k"] = (jnp.repeat(qkv[n], Hv // H, axis=2) for n in "qk")
        q, k, v = (constrain(qkv[n], ("batch", "length", "heads", "kv")) for n in "qkv")
        beta = jax.nn.sigmoid(dense((Hv,), ("embed", "heads"), name="b_proj", **kw)(x)
                              .astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        g, gk = self.decay(x)
        o, state = step_or_chunk(gated_delta_rule, gated_delta_rule_step, q, k, v, beta, g, gk,
                                 state=None if cache is None else cache["state"],
                                 segment_ids=segment_ids, use_qk_l2norm=True, impl=self.impl,
                                 chunk_size=self.chunk_size)
        o = GatedRMSNorm(self.norm_eps, self.dtype, activation=self.gate_activation,
                         name="o_norm")(o, self.output_gate(x))
        return project_out_with_state(o, self.d_model, state, cache, new_cache, **kw)

    # What the variants of the delta rule change (called inside the compact __call__, so they
    # may create parameters): the decay and the output gate.
    gate_activation = "silu"

    def decay(self, x):
        """(g [B, T, Hv] | None, gk [B, T, Hv, K] | None): Gated DeltaNet's per-head decay
        g = −exp(A_log) · softplus(W_a x + dt_bias), or none (DeltaNet)."""
        if not self.use_decay:
            return None, None
        Hv = self.value_heads
        a = dense((Hv,), ("embed", "heads"), name="a_proj", std=self.init_std,
                  dtype=self.dtype)(x).astype(jnp.float32)
        dt = jax.nn.softplus(a + head_param(self, "dt_bias", dt_bias_init, Hv))
        return -jnp.exp(head_param(self, "A_log", a_log_init, Hv)) * dt, None

    def output_gate(self, x):
        """The gate of the output norm, [B, T, Hv, V] (None without use_gate): W_g x."""
        if not self.use_gate:
            return None
        return dense((self.value_heads, self.value_dim), ("embed", "heads", "kv"), name="g_proj",
                     std=self.init_std, dtype=self.dtype)(x)


_SETTINGS = {
    "expand_v": Setting(1.0, float, "value head width = expand_v · head_dim"),
    "allow_neg_eigval": Setting(False, bool, "β = 2·sigmoid: eigenvalues of I − βkkᵀ in [−1, 1]"),
    "num_v_heads": Setting(None, int, "value heads, a multiple of num_heads (None: num_heads); "
                                      "each q/k head serves num_v_heads / num_heads of them",
                           optional=True),
    "use_gate": Setting(True, bool, "output gate: o_proj(RMSNorm(o) ⊙ SiLU(W_g x)); "
                                    "False: o_proj(RMSNorm(o))"),
    **conv_settings(True),
}
# fla's DeltaNet layer has no output gate by default (its GatedDeltaNet has one).
_DELTANET_SETTINGS = {**_SETTINGS, "use_gate": dataclasses.replace(_SETTINGS["use_gate"], default=False)}


def _check(shared: Shared, s) -> None:
    positive_int(s, "conv_size", "num_v_heads")
    if s["num_v_heads"] is not None and s["num_v_heads"] % shared.num_heads:
        raise SettingError("num_v_heads", f"must be a multiple of num_heads = {shared.num_heads}, "
                                          f"got {s['num_v_heads']}")
    width_multiplier(s, "expand_v", shared.head_dim)


def _builder(use_decay: bool):
    def build(shared: Shared, s, name):
        return GatedDeltaNet(d_model=shared.d_model, num_heads=shared.num_heads,
                             head_dim=shared.head_dim, expand_v=s["expand_v"],
                             use_decay=use_decay, allow_neg_eigval=s["allow_neg_eigval"],
                             num_v_heads=s["num_v_heads"], use_gate=s["use_gate"],
                             conv_size=s["conv_size"], use_short_conv=s["short_conv"],
                             norm_eps=shared.norm_eps, init_std=shared.init_std,
                             dtype=shared.dtype, impl=shared.impl,
                             chunk_size=shared.chunk_size, name=name)
    return build


register(Mechanism("gdn", "token", _builder(True), _SETTINGS, _check,
                   "Gated DeltaNet: delta rule with a Mamba2 scalar decay", recurrent=True,
                   context_parallel=True))
register(Mechanism("deltanet", "token", _builder(False), _DELTANET_SETTINGS, _check,
                   "DeltaNet: the delta rule without decay", recurrent=True,
                   context_parallel=True))
