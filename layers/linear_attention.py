"""The linear-attention family on `pallas_kernels.linear_attention`:

  la         φ(q), φ(k) with φ = identity | elu+1 | Based 2nd-order Taylor (feature_dim f:
             φ(x) = [1, x, vec(x xᵀ)/√2] on x·f^(-1/4), so φ(q)·φ(k) ≈ exp(q·k/√f)); no decay.
  retnet     multi-scale retention (RetNet; as fla's MultiScaleRetention and torchscale's):
             RoPE on q, k; fixed per-head decays γ_h = 1 − 2^(−5−h); value heads, the SiLU
             output gate and the output are expand_v (2: fla's expand_v, torchscale's
             value_factor) × head_dim wide.
  lightning  Lightning attention as TransNormerLLM's NormLinearAttention (OpenNLPLab, the HF
             modeling_transnormer.py; lightning-attention's torch reference): q, k = SiLU(W x),
             v = W_v x, no q scale; per-head decay exp(−s_h · (1 − l/(L−1) + 1e-5)), l the layer
             index, s_h the ALiBi slopes (`alibi_slopes`: 2^(−8(h+1)/H) for H a power of two,
             interpolated otherwise); the output is normalised over the full H·V width by a
             parameter-free RMSNorm (their SimpleRMSNorm) and multiplied by a linear gate
             u = W_u x (no activation) before o_proj. Not built: their optional LRPE on q, k
             (linear_use_lrpe). MiniMax-01's variant (a weighted norm, a sigmoid gate, SiLU v)
             is not a setting here.
  gla        Gated linear attention: per-key log-gates logsigmoid(W₂W₁x + b)/τ, rank 16, τ = 16;
             value heads expand_v × head_dim wide (fla's GLA: expand_k = 0.5, expand_v = 1).

Any kind can put q, k, v through the same short convs first (`use_short_conv`; on for all with
`ModelConfig.short_conv=True`). All read out o = Sᵀ(scale·q)
per head, normalise with a per-head RMSNorm (gated by SiLU(W_g x) for retnet, gla;
lightning's norm and gate are its own, above) and project back with o_proj. The short convs
start N(0, init_std²), as fla's models initialise every Conv1d. The decode cache is the
[B, H, K, V] float32 state (plus the conv inputs with short convs).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.common import constrain, dense, project_out_with_state, step_or_chunk
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.norm import GatedRMSNorm, _rms
from layers.registry import (Mechanism, Setting, SettingError, Shared, positive_int, register,
                             width_multiplier)
from layers.rope import apply_rope, check_rope_head_dim
from pallas_kernels.linear_attention import linear_attention, linear_attention_step

KINDS = ("la", "retnet", "lightning", "gla")
FEATURE_MAPS = ("identity", "elu", "taylor")


def taylor_feature_map(x):
    f = x.shape[-1]
    x = x.astype(jnp.float32) * f ** -0.25
    x2 = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (f * f,)) / math.sqrt(2)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, x2], axis=-1)


def retnet_log_decays(num_heads: int) -> jax.Array:
    return jnp.log1p(-2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32)))


def alibi_slopes(num_heads: int, xp=np):
    """TransNormerLLM's per-head decay rates (`_build_slope_tensor`, ALiBi's slopes): for a
    power of two H, 2^(−8(h+1)/H); otherwise those of the largest power of two p < H, then
    every other slope of 2p (the odd powers 2^(−4(2j+1)/p)) for the H − p heads left.
    `xp=jnp` inside the layer, so that the slopes are traced ops, never an H-long host array
    (an abstract trace of a huge head count stays abstract)."""
    p = 2 ** int(math.floor(math.log2(num_heads)))
    h = xp.arange(num_heads)
    return xp.where(h < p, 2.0 ** (-8.0 * (h + 1) / p), 2.0 ** (-4.0 * (2 * (h - p) + 1) / p))


def lightning_log_decays(num_heads: int, layer_idx, num_layers: int) -> jax.Array:
    """−s_h · (1 − l/(L−1) + 1e-5): TransNormerLLM scales the slopes by depth, so the first
    layer decays fastest and the last almost not at all. One layer (L = 1), where the
    reference divides by zero, counts as the first."""
    slopes = alibi_slopes(num_heads, jnp).astype(jnp.float32)
    depth = 1.0 - jnp.asarray(layer_idx, jnp.float32) / max(num_layers - 1, 1) + 1e-5
    return -slopes * depth


class LinearAttention(nn.Module):
    kind: str
    d_model: int
    num_heads: int
    head_dim: int
    num_layers: int = 1          # lightning
    feature_map: str = "elu"     # la
    feature_dim: int = 16        # la with the taylor map
    conv_size: int = 4
    use_short_conv: bool = False  # SiLU(short conv) on q, k, v
    gate_rank: int = 16          # gla
    gate_normalizer: float = 16.0  # gla
    expand_v: float = 1.0        # gla, retnet: value head width = expand_v · head_dim
    rope_theta: float = 10000.0  # retnet
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    chunk_size: int = 64

    @property
    def taylor(self) -> bool:
        return self.kind == "la" and self.feature_map == "taylor"

    @property
    def proj_dim(self) -> int:
        """Width per head of the q/k projections (before the Taylor feature map)."""
        return self.feature_dim if self.taylor else self.head_dim

    @property
    def key_dim(self) -> int:
        """Width per head of the keys the state is built from (after the feature map)."""
        return 1 + self.feature_dim + self.feature_dim ** 2 if self.taylor else self.head_dim

    @property
    def value_dim(self) -> int:
        return int(round(self.head_dim * self.expand_v))

    def init_cache(self, batch: int, max_len: int) -> dict:
        H, D = self.num_heads, self.value_dim
        cache = {"state": jnp.zeros((batch, H, self.key_dim, D), jnp.float32)}
        if self.use_short_conv:
            dq = self.proj_dim
            cache.update(qkv_conv_cache(batch, {"q": (H, dq), "k": (H, dq), "v": (H, D)},
                                        self.conv_size, self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=0):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        B, T, _ = x.shape
        H, D = self.num_heads, self.value_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        taylor, dq = self.taylor, self.proj_dim
        q = dense((H, dq), ("embed", "heads", "kv"), name="q_proj", **kw)(x)
        k = dense((H, dq), ("embed", "heads", "kv"), name="k_proj", **kw)(x)
        v = dense((H, D), ("embed", "heads", "kv"), name="v_proj", **kw)(x)
        g = gk = gate = scale = None
        new_cache = {}
        if self.use_short_conv:
            qkv, new_cache = short_conv_qkv({"q": q, "k": k, "v": v}, self.conv_size,
                                            segment_ids, cache, self.dtype, std=self.init_std)
            q, k, v = qkv["q"], qkv["k"], qkv["v"]
        if self.kind == "la":
            if self.feature_map == "elu":
                q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
            elif taylor:
                q, k = taylor_feature_map(q).astype(self.dtype), taylor_feature_map(k).astype(self.dtype)
                scale = 1.0
            elif self.feature_map != "identity":
                raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, "
                                 f"got {self.feature_map!r}")
        elif self.kind == "retnet":
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
            g = jnp.broadcast_to(retnet_log_decays(H), (B, T, H))
        elif self.kind == "lightning":
            q, k = jax.nn.silu(q), jax.nn.silu(k)
            g = jnp.broadcast_to(lightning_log_decays(H, layer_idx, self.num_layers), (B, T, H))
            scale = 1.0
        elif self.kind == "gla":
            r = dense(self.gate_rank, ("embed", None), name="gk_proj_a", **kw)(x)
            gk = dense((H, dq), (None, "heads", "kv"), name="gk_proj_b", use_bias=True, **kw)(r)
            gk = jax.nn.log_sigmoid(gk.astype(jnp.float32)) / self.gate_normalizer
        if self.kind != "la":
            gate = dense((H, D), ("embed", "heads", "kv"), name="g_proj", **kw)(x)

        q = constrain(q, ("batch", "length", "heads", "kv"))
        k = constrain(k, ("batch", "length", "heads", "kv"))
        o, state = step_or_chunk(linear_attention, linear_attention_step, q, k, v, g, gk,
                                 scale=scale, state=None if cache is None else cache["state"],
                                 segment_ids=segment_ids, impl=self.impl,
                                 chunk_size=self.chunk_size)
        if self.kind == "lightning":   # one parameter-free RMSNorm over all heads, linear gate
            o = _rms(o.reshape(B, T, H * D), self.norm_eps).reshape(B, T, H, D)
            o = (o * gate.astype(jnp.float32)).astype(self.dtype)
        else:
            o = GatedRMSNorm(self.norm_eps, self.dtype, name="o_norm")(o, gate)
        return project_out_with_state(o, self.d_model, state, cache, new_cache, **kw)


def _settings(kind: str) -> dict:
    s = conv_settings(False)
    if kind == "la":
        s["feature_map"] = Setting("elu", str, f"one of {FEATURE_MAPS}")
        s["feature_dim"] = Setting(16, int, "q/k feature dim per head of the taylor map")
    if kind == "gla":
        s["gate_rank"] = Setting(16, int, "rank of the low-rank gate projection")
        s["gate_normalizer"] = Setting(16.0, float, "log-gate temperature")
    if kind in ("gla", "retnet"):   # fla's defaults: GLA 1, MultiScaleRetention 2
        s["expand_v"] = Setting(2.0 if kind == "retnet" else 1.0, float,
                                "value head width = expand_v · head_dim")
    return s


def _check(shared: Shared, s) -> None:
    positive_int(s, *(f for f in ("conv_size", "feature_dim", "gate_rank") if f in s))
    if "feature_map" in s and s["feature_map"] not in FEATURE_MAPS:
        raise SettingError("feature_map", f"must be one of {FEATURE_MAPS}, "
                                          f"got {s['feature_map']!r}")
    if s.get("gate_normalizer", 1.0) <= 0:
        raise SettingError("gate_normalizer", f"must be > 0, got {s['gate_normalizer']}")
    if "expand_v" in s:
        width_multiplier(s, "expand_v", shared.head_dim)


def _check_rope(shared: Shared, s) -> None:
    _check(shared, s)
    check_rope_head_dim(shared)


_KIND_FIELDS = ("feature_map", "feature_dim", "gate_rank", "gate_normalizer", "expand_v")


def _builder(kind: str):
    def build(shared: Shared, s, name):
        return LinearAttention(kind=kind, d_model=shared.d_model, num_heads=shared.num_heads,
                               head_dim=shared.head_dim, num_layers=shared.num_layers,
                               **{k: s[k] for k in _KIND_FIELDS if k in s}, conv_size=s["conv_size"], use_short_conv=s["short_conv"],
                               rope_theta=shared.rope_theta, norm_eps=shared.norm_eps,
                               init_std=shared.init_std, dtype=shared.dtype, impl=shared.impl,
                               chunk_size=shared.chunk_size, name=name)
    return build


_SUMMARIES = {
    "la": "linear attention with a feature map, no decay",
    "retnet": "multi-scale retention: fixed per-head decays, RoPE, 2x wide values",
    "lightning": "Lightning attention (TransNormerLLM): per-head, per-layer fixed decays",
    "gla": "gated linear attention: per-key data-dependent gates",
}
for _kind in KINDS:
    register(Mechanism(_kind, "token", _builder(_kind), _settings(_kind),
                       _check_rope if _kind == "retnet" else _check, _SUMMARIES[_kind],
                       recurrent=True, context_parallel=True))
