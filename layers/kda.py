"""Kimi Delta Attention (`kda`, Kimi Linear tech report, arXiv 2510.26692) on
`pallas_kernels.gated_delta_rule` with per-key gates, as fla's KimiDeltaAttention layer
(fla/layers/kda.py; transformers' KimiLinearDeltaAttention is the same layer):

  q, k, v, β, the short convs, the q/k L2 norm, grouped value heads (num_v_heads), the cache
  and packed documents: Gated DeltaNet's (`layers.gated_deltanet.GatedDeltaNet`, which this
  layer extends);
  the decay is per key (channel-wise): gk = −exp(A_log) · softplus(W_fb W_fa x + dt_bias),
  through a low-rank projection (W_fa: d_model → value head width, W_fb: → Hv·K, no biases),
  dt_bias [Hv, K] (the Mamba2 dt init per channel), A_log [Hv] (A ~ U(1, 16)); with
  `lower_bound` (fla's bounded "safe" gate) gk = lower_bound · sigmoid(exp(A_log) ·
  (W_fb W_fa x + dt_bias)) in (lower_bound, 0), and A_log starts at 0 (fla's safe_gate init);
  the state decays by Diag(exp(gk_t)) before each delta update (fla's naive_recurrent_kda);
  the output y = o_proj(RMSNorm(o) ⊙ sigmoid(W_gb W_ga x + b_g)) per value head, the gate
  low-rank too (W_ga: d_model → value head width, W_gb with a bias b_g as fla's, or without
  one as transformers' KimiLinearDeltaAttention and the Kimi Linear release: `gate_bias`).

Decode cache: the [B, Hv, K, V] float32 state and the conv inputs, as Gated DeltaNet's.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import a_log_init, dense, dt_bias_init, head_param
from layers.gated_deltanet import _SETTINGS as _GDN_SETTINGS
from layers.gated_deltanet import GatedDeltaNet
from layers.gated_deltanet import _check as _gdn_check
from layers.registry import Mechanism, Setting, SettingError, Shared, register


class KimiDeltaAttention(GatedDeltaNet):
    lower_bound: Optional[float] = None    # fla's bounded gate: gk in (lower_bound, 0)
    gate_bias: bool = True                 # fla's g_proj has one; Kimi Linear's release not

    gate_activation = "sigmoid"

    def decay(self, x):
        """(None, gk [B, T, Hv, K]): fla's KDA gate on a low-rank projection."""
        Hv, K, V = self.value_heads, self.head_dim, self.value_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        r = dense(V, ("embed", None), name="gk_proj_a", **kw)(x)
        f = dense((Hv, K), (None, "heads", "kv"), name="gk_proj_b", **kw)(r).astype(jnp.float32)
        f = f + self.param("dt_bias", nn.with_logical_partitioning(dt_bias_init, ("heads", "kv")),
                           (Hv, K), jnp.float32)
        a_init = a_log_init if self.lower_bound is None else nn.initializers.zeros
        A = jnp.exp(head_param(self, "A_log", a_init, Hv))[:, None]
        if self.lower_bound is None:
            return None, -A * jax.nn.softplus(f)
        return None, self.lower_bound * jax.nn.sigmoid(A * f)

    def output_gate(self, x):
        """The sigmoid gate's input [B, T, Hv, V]: W_gb W_ga x + b_g."""
        Hv, V = self.value_heads, self.value_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        r = dense(V, ("embed", None), name="g_proj_a", **kw)(x)
        return dense((Hv, V), (None, "heads", "kv"), name="g_proj_b", use_bias=self.gate_bias,
                     **kw)(r)


_SETTINGS = {
    **{k: s for k, s in _GDN_SETTINGS.items() if k != "use_gate"},
    "lower_bound": Setting(None, float, "fla's bounded gate: gk = lower_bound · sigmoid(exp(A_log)"
                                        " · (W_f x + dt_bias)), in (lower_bound, 0), A_log "
                                        "starting at 0 (None: −exp(A_log) · softplus(...))",
                           optional=True),
    "gate_bias": Setting(True, bool, "a bias on the output gate's projection (fla's KDA); "
                                     "False: none (Kimi Linear's release)"),
}


def _check(shared: Shared, s) -> None:
    _gdn_check(shared, s)
    if s["lower_bound"] is not None and not s["lower_bound"] < 0:
        raise SettingError("lower_bound", f"must be < 0 (a log decay), got {s['lower_bound']}")


def _build(shared: Shared, s, name):
    return KimiDeltaAttention(d_model=shared.d_model, num_heads=shared.num_heads,
                              head_dim=shared.head_dim, expand_v=s["expand_v"],
                              allow_neg_eigval=s["allow_neg_eigval"],
                              num_v_heads=s["num_v_heads"], lower_bound=s["lower_bound"],
                              gate_bias=s["gate_bias"],
                              conv_size=s["conv_size"], use_short_conv=s["short_conv"],
                              norm_eps=shared.norm_eps, init_std=shared.init_std,
                              dtype=shared.dtype, impl=shared.impl,
                              chunk_size=shared.chunk_size, name=name)


register(Mechanism("kda", "token", _build, _SETTINGS, _check,
                   "Kimi Delta Attention: delta rule with a per-key (channel-wise) decay",
                   recurrent=True, context_parallel=True))
