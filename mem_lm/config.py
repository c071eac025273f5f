"""ModelConfig: one dataclass that chooses the whole model. Validated on construction; every
error names the field. JSON-serialisable through `dataclasses.asdict`, and `ModelConfig(**d)`
round-trips (lists are accepted where tuples are expected)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from layers.linear_attention import FEATURE_MAPS
from pallas_kernels.attention import IMPLS as ATTN_IMPLS

MIXERS = ("attn", "swa", "la", "retnet", "lightning", "ssd", "gla", "gdn", "deltanet")
RECURRENT = ("la", "retnet", "lightning", "ssd", "gla", "gdn", "deltanet")
# Mixers whose q, k, v go through a causal short conv unless `short_conv` says otherwise
# (as in the papers and in flash-linear-attention's defaults).
CONV_BY_DEFAULT = ("ssd", "gdn", "deltanet")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots", "dots_no_batch")
IMPLS = ("auto", "reference", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    # Mixer names, repeated to fill num_layers (num_layers % len(pattern) == 0).
    pattern: Sequence[str] = ("attn",)
    num_kv_heads: Optional[int] = None     # GQA for attn/swa; default num_heads
    head_dim: Optional[int] = None         # default d_model // num_heads
    mlp_ratio: float = 8 / 3               # SwiGLU hidden = round_up(mlp_ratio · d_model, 8)
    d_ff: Optional[int] = None             # overrides mlp_ratio
    use_mlp: bool = True                   # False: mixer-only blocks (Zoology MQAR models)
    window: int = 512                      # swa
    attn_sinks: bool = False               # attn/swa: a learned sink logit per head
    rope_theta: float = 10000.0            # attn/swa/retnet
    tie_embeddings: bool = True
    dtype: str = "float32"                 # compute dtype; params are always float32
    scan_layers: bool = False              # nn.scan over the repeated pattern groups
    remat: str = "none"                    # none | full | dots | dots_no_batch
    impl: str = "auto"                     # linear_attention / gated_delta_rule impl
    attn_impl: str = "auto"                # softmax attention impl: auto | reference | xla |
                                           # cudnn (GPU) | splash (TPU)
    chunk_size: int = 64                   # chunk of the recurrent ops
    feature_map: str = "elu"               # la: identity | elu | taylor
    feature_dim: int = 16                  # la with taylor: q/k feature dim per head
    expand_v: float = 1.0                  # gdn/deltanet value head = expand_v · head_dim
    allow_neg_eigval: bool = False         # gdn/deltanet: β = 2·sigmoid
    conv_size: int = 4                     # width of the q/k/v short convs
    # q/k/v short convs for every mixer (True), none (False), or the mixer's default (None:
    # on for ssd/gdn/deltanet only). True gives attention and the linear attentions the token
    # shift that the delta-rule models have built in, for like-for-like comparisons.
    short_conv: Optional[bool] = None
    gate_rank: int = 16                    # gla low-rank gate projection
    gate_normalizer: float = 16.0          # gla log-gate temperature
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.pattern, str):
            object.__setattr__(self, "pattern", (self.pattern,))
        object.__setattr__(self, "pattern", tuple(self.pattern))

        def need(ok, field, msg):
            if not ok:
                raise ValueError(f"ModelConfig.{field}: {msg} (got {getattr(self, field)!r})")

        def pos_int(field):
            v = getattr(self, field)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, field,
                 "must be a positive int")

        for f in ("vocab_size", "d_model", "num_layers", "num_heads", "window", "chunk_size",
                  "feature_dim", "conv_size", "gate_rank"):
            pos_int(f)
        need(len(self.pattern) >= 1, "pattern", "must name at least one mixer")
        bad = [m for m in self.pattern if m not in MIXERS]
        need(not bad, "pattern", f"unknown mixer(s) {bad}; known: {MIXERS}")
        need(self.num_layers % len(self.pattern) == 0, "num_layers",
             f"must be a multiple of len(pattern) = {len(self.pattern)}")
        if self.head_dim is None:
            need(self.d_model % self.num_heads == 0, "num_heads",
                 f"must divide d_model = {self.d_model} (or set head_dim)")
        else:
            pos_int("head_dim")
        if self.num_kv_heads is not None:
            pos_int("num_kv_heads")
            need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide num_heads = {self.num_heads}")
        if self.d_ff is not None:
            pos_int("d_ff")
        need(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        need(self.chunk_size & (self.chunk_size - 1) == 0, "chunk_size",
             "must be a power of two")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.remat in REMAT, "remat", f"must be one of {REMAT}")
        need(self.impl in IMPLS, "impl", f"must be one of {IMPLS}")
        need(self.attn_impl in ATTN_IMPLS, "attn_impl", f"must be one of {ATTN_IMPLS}")
        need(self.feature_map in FEATURE_MAPS, "feature_map", f"must be one of {FEATURE_MAPS}")
        need(self.expand_v > 0 and float(self.resolved_head_dim * self.expand_v).is_integer(),
             "expand_v", f"must be > 0 with expand_v · head_dim ({self.resolved_head_dim}) "
             "an integer")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.init_std > 0, "init_std", "must be > 0")
        need(self.gate_normalizer > 0, "gate_normalizer", "must be > 0")
        need(self.short_conv in (None, True, False), "short_conv", "must be None, True or False")
        if any(m in ("attn", "swa", "retnet") for m in self.pattern):
            need(self.resolved_head_dim % 2 == 0, "head_dim", "must be even for RoPE")

    # ----------------------------------------------------------------- derived sizes
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    def uses_short_conv(self, mixer: str) -> bool:
        return mixer in CONV_BY_DEFAULT if self.short_conv is None else bool(self.short_conv)

    @property
    def resolved_num_kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-int(math.ceil(self.mlp_ratio * self.d_model)) // 8) * 8

    @property
    def num_groups(self) -> int:
        return self.num_layers // len(self.pattern)

    @property
    def layer_mixers(self) -> tuple:
        return self.pattern * self.num_groups

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mixer_param_count(cfg: ModelConfig, mixer: str) -> int:
    """Parameters of one token mixer (see the formulas in README / module docs)."""
    d, H, D = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    HD = H * D
    conv = cfg.conv_size if cfg.uses_short_conv(mixer) else 0   # per q/k/v channel
    if mixer in ("attn", "swa"):
        kv = cfg.resolved_num_kv_heads * D
        return (d * HD + 2 * d * kv + HD * d + (H if cfg.attn_sinks else 0)
                + conv * (HD + 2 * kv))
    if mixer in ("gdn", "deltanet"):
        V = H * int(round(D * cfg.expand_v))
        n = 2 * d * HD + d * V                  # q, k, v projections
        n += conv * (2 * HD + V)                 # three depthwise convs
        n += d * H                               # β projection
        if mixer == "gdn":
            n += d * H + 2 * H                   # a projection, A_log, dt_bias
        n += d * V + V // H + V * d              # output gate, per-head norm, o_proj
        return n
    # linear attention family
    if mixer == "la" and cfg.feature_map == "taylor":
        n = 2 * d * H * cfg.feature_dim + d * HD + conv * (2 * H * cfg.feature_dim + HD)
    else:
        n = 3 * d * HD + conv * 3 * HD
    n += D + HD * d                              # per-head output norm, o_proj
    if mixer != "la":
        n += d * HD                              # output gate
    if mixer == "ssd":
        n += d * H + 3 * H                       # dt projection, dt_bias, A_log, D
    if mixer == "gla":
        n += d * cfg.gate_rank + cfg.gate_rank * HD + HD
    return n


def param_count(cfg: ModelConfig) -> int:
    """Total parameter count:
        vocab·d (embedding) [+ d·vocab untied head] + d (final norm)
        + Σ_layers [ d (pre-norm) + mixer + (use_mlp: d + 3·d·d_ff) ]."""
    d = cfg.d_model
    n = cfg.vocab_size * d + d + (0 if cfg.tie_embeddings else d * cfg.vocab_size)
    for m in cfg.layer_mixers:
        n += d + mixer_param_count(cfg, m)
        if cfg.use_mlp:
            n += d + 3 * d * cfg.resolved_d_ff
    return n
