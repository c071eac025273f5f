"""ModelConfig: one dataclass that chooses the whole model. Validated on construction; every
error names the field. `to_dict()` is JSON-serialisable and `ModelConfig.from_dict(d)`
round-trips it (lists are accepted where tuples are expected).

Model-wide fields are flat; each mechanism's own settings are nested under `mixers`, e.g.
`mixers={"swa": {"window": 64}, "gdn": {"expand_v": 2.0}}`. The schema, defaults and checks
of those settings come from the registry (layers/registry.py). A resolved config holds the
full settings of every mechanism its patterns name (and nothing about the others), so two
configs that build the same model compare equal.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp

from layers import registry
from layers.registry import SettingError, Shared
from pallas_kernels.attention import IMPLS as ATTN_IMPLS

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots", "dots_no_batch")
IMPLS = ("auto", "reference", "xla", "pallas")


def token_mixers() -> tuple:
    """Registered token-mixer names (the choices of `pattern`)."""
    return registry.names("token")


def channel_mixers() -> tuple:
    """Registered channel-mixer names (the choices of `channel_pattern`)."""
    return registry.names("channel")


def recurrent_mixers() -> tuple:
    """Token mixers with a fixed-size state."""
    return tuple(n for n in token_mixers() if registry.get(n).recurrent)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    # Token-mixer names, repeated to fill num_layers.
    pattern: Sequence[str] = ("attn",)
    # Channel-mixer (MLP slot) names, repeated to fill num_layers; "none" = no MLP.
    channel_pattern: Sequence[str] = ("swiglu",)
    # Per-mechanism settings {name: {field: value}} over the registry's defaults.
    mixers: Any = ()
    head_dim: Optional[int] = None         # default d_model // num_heads
    rope_theta: float = 10000.0            # attn/swa/retnet
    tie_embeddings: bool = True
    dtype: str = "float32"                 # compute dtype; params are always float32
    scan_layers: bool = False              # nn.scan over the repeated pattern groups
    remat: str = "none"                    # none | full | dots | dots_no_batch
    impl: str = "auto"                     # linear_attention / gated_delta_rule impl
    attn_impl: str = "auto"                # softmax attention impl: auto | reference | xla |
                                           # cudnn (GPU) | splash (TPU)
    chunk_size: int = 64                   # chunk of the recurrent ops
    norm_eps: float = 1e-6
    # The block, final and attention q/k RMSNorms scale by (1 + w), w stored and initialised
    # at 0 (Qwen3-Next's Qwen3NextRMSNorm); False: by w, from 1.
    zero_centred_norms: bool = False
    init_std: float = 0.02
    # Segment recurrence around the whole block stack (mem_lm/segments.py), e.g.
    # {"kind": "rmt", "length": 512, "memory_tokens": 10, "bptt": None, "replay": False} or
    # {"kind": "armt", ..., "d_mem": 32, "nu": 3, "correction": True}; None = off.
    segments: Any = None

    def __post_init__(self):
        for f in ("pattern", "channel_pattern"):
            v = getattr(self, f)
            try:
                object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))
            except TypeError:
                raise ValueError(f"ModelConfig.{f}: must be a mechanism name or a sequence of "
                                 f"them (got {v!r})") from None

        def need(ok, field, msg):
            if not ok:
                raise ValueError(f"ModelConfig.{field}: {msg} (got {getattr(self, field)!r})")

        def pos_int(field):
            v = getattr(self, field)
            need(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= registry.MAX_INT,
                 field, "must be an int in [1, 2**31 - 1]")

        for f in ("vocab_size", "d_model", "num_layers", "num_heads", "chunk_size"):
            pos_int(f)
        for f, known in (("pattern", token_mixers()), ("channel_pattern", channel_mixers())):
            need(len(getattr(self, f)) >= 1, f, "must name at least one mechanism")
            bad = [m for m in getattr(self, f) if m not in known]
            need(not bad, f, f"unknown mechanism(s) {bad}; known: {known}")
        need(self.num_layers % self.group_size == 0, "num_layers",
             f"must be a multiple of lcm(len(pattern), len(channel_pattern)) = {self.group_size}")
        if self.head_dim is None:
            need(self.d_model % self.num_heads == 0, "num_heads",
                 f"must divide d_model = {self.d_model} (or set head_dim)")
        else:
            pos_int("head_dim")
        need(self.chunk_size & (self.chunk_size - 1) == 0, "chunk_size",
             "must be a power of two")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.remat in REMAT, "remat", f"must be one of {REMAT}")
        need(self.impl in IMPLS, "impl", f"must be one of {IMPLS}")
        need(self.attn_impl in ATTN_IMPLS, "attn_impl", f"must be one of {ATTN_IMPLS}")
        for f in ("norm_eps", "init_std", "rope_theta"):
            v = self.__dict__[f]
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)
                 and v > 0, f, "must be a finite number > 0")
        for f in ("tie_embeddings", "scan_layers", "zero_centred_norms"):
            need(isinstance(getattr(self, f), bool), f, "must be True or False")
        object.__setattr__(self, "mixers", self._resolve_mixers())
        object.__setattr__(self, "segments", _resolve_segments(self.segments))

    def _resolve_mixers(self) -> tuple:
        """The settings of every mechanism in the patterns, as a sorted, hashable tuple of
        (name, ((field, value), ...)); overrides of other registered mechanisms are checked
        and dropped."""
        given = _as_mapping(self.mixers, "ModelConfig.mixers",
                            "must map mechanism names to their settings")
        used = set(self.pattern) | set(self.channel_pattern)
        shared = self.shared()
        for name in given:
            try:
                registry.get(name)
            except ValueError as e:
                raise ValueError(f"ModelConfig.mixers: {e}") from None
        out = []
        for name in sorted(set(given) | used):
            mech = registry.get(name)
            overrides = given.get(name)
            overrides = _as_mapping({} if overrides is None else overrides,
                                    f"ModelConfig.mixers.{name}", "must map field names to values")
            try:
                settings = mech.resolve(overrides)
                if mech.check is not None and name in used:
                    mech.check(shared, settings)
            except SettingError as e:
                where = (f"ModelConfig.{e.field}" if e.field in _SHARED_FIELDS
                         else f"ModelConfig.mixers.{name}.{e.field}")
                raise ValueError(f"{where}: {e.msg} (needed by {name!r})"
                                 if e.field in _SHARED_FIELDS else f"{where}: {e.msg}") from None
            if name in used:
                out.append((name, tuple(sorted(settings.items()))))
        return tuple(out)

    # ----------------------------------------------------------------- derived values
    def settings(self, name: str) -> dict:
        """The resolved settings of mechanism `name` (one the patterns use)."""
        for n, s in self.mixers:
            if n == name:
                return dict(s)
        raise ValueError(f"mechanism {name!r} is not in this config's patterns "
                         f"{self.pattern} / {self.channel_pattern}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    def shared(self) -> Shared:
        """The model-wide values the mechanisms' modules are built from."""
        return Shared(d_model=self.d_model, num_heads=self.num_heads,
                      head_dim=self.resolved_head_dim, num_layers=self.num_layers,
                      dtype=jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32,
                      init_std=self.init_std, norm_eps=self.norm_eps, impl=self.impl,
                      attn_impl=self.attn_impl, chunk_size=self.chunk_size,
                      rope_theta=self.rope_theta, zero_centred_norms=self.zero_centred_norms)

    @property
    def segment_settings(self) -> Optional[dict]:
        """The resolved segment-recurrence settings ({kind, length, memory_tokens, bptt,
        replay}, and for ARMT d_mem, nu, correction), or None for a model without segments."""
        return None if self.segments is None else dict(self.segments)

    @property
    def group_size(self) -> int:
        """Layers in one repetition of both patterns (the unit scan_layers scans over)."""
        return math.lcm(len(self.pattern), len(self.channel_pattern))

    @property
    def num_groups(self) -> int:
        return self.num_layers // self.group_size

    def layer_kinds(self, layer: int) -> tuple:
        """(token mixer, channel mixer) of layer `layer`."""
        return (self.pattern[layer % len(self.pattern)],
                self.channel_pattern[layer % len(self.channel_pattern)])

    @property
    def layer_mixers(self) -> tuple:
        """The token mixer of every layer."""
        return tuple(self.layer_kinds(i)[0] for i in range(self.num_layers))

    def context_parallel_errors(self) -> tuple:
        """((field, why), ...): the parts of this model that cannot run with T split over a
        mesh's `context` axis (context parallelism, `layers.common.over_context`): token
        mixers whose `Mechanism.context_parallel` says no for their settings
        (`mixers.<name>`), and segment recurrence (`segments`, whose scan over segments would
        cross the devices' slices). Empty when the whole model can."""
        out = []
        for name in dict.fromkeys(self.pattern + self.channel_pattern):
            why = registry.get(name).context_parallel_error(self.settings(name))
            if why is not None:
                out.append((f"mixers.{name}", why))
        if self.segments is not None:
            out.append(("segments", "segment recurrence scans over the segments of the whole "
                                    "sequence; it has no context-parallel path"))
        return tuple(out)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pattern"], d["channel_pattern"] = list(self.pattern), list(self.channel_pattern)
        d["mixers"] = {n: dict(s) for n, s in self.mixers}
        d["segments"] = None if self.segments is None else dict(self.segments)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """A config from `to_dict()` output, a trainer's `config.model` group, or a checkpoint
        written before mechanism settings were nested (its flat fields are moved, with a
        warning)."""
        d = dict(d)
        legacy = {k: d.pop(k) for k in list(d) if k in _LEGACY_FIELDS}
        if legacy:
            warnings.warn(f"ModelConfig: flat field(s) {sorted(legacy)} are now mechanism "
                          "settings under `mixers`; moved there", DeprecationWarning,
                          stacklevel=2)
            d = _migrate(d, legacy)
        fields = dataclasses.fields(cls)
        known = [f.name for f in fields]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ValueError(f"ModelConfig.{unknown[0]}: unknown field; known: {known}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"ModelConfig.{missing[0]}: missing (a required field)")
        return cls(**d)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:   # an int beyond float range
        return False


def _as_mapping(value, where: str, what: str) -> Mapping:
    """`value` as a mapping (a dict, or pairs as `dataclasses.asdict` leaves them)."""
    if isinstance(value, Mapping):
        return value
    try:
        return dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what}, got {value!r}") from None


SEGMENT_KINDS = ("rmt", "armt")
# Settings of `segments`: name -> default (None for "bptt" = full backpropagation through time;
# "length" has no default). "replay" recomputes each segment in the backward pass.
_SEGMENT_DEFAULTS = {"kind": "rmt", "length": None, "memory_tokens": 10, "bptt": None,
                     "replay": False}
# ARMT's own settings (Rodkin et al. 2024; modeling_amt/language_modeling.py): d_mem, the
# width of W_mq / W_mk; nu, DPFP's order (keys of 2 * nu * d_mem features); correction, the
# gamma correction of the normaliser z. Defaults: the associative-retrieval script's D_MEM=32,
# the wrapper's hard-coded nu = 3 and correction=True.
_ARMT_DEFAULTS = {"d_mem": 32, "nu": 3, "correction": True}
_SEGMENT_KIND_DEFAULTS = {"rmt": _SEGMENT_DEFAULTS,
                          "armt": {**_SEGMENT_DEFAULTS, **_ARMT_DEFAULTS}}


def segment_setting_names() -> tuple:
    """Every setting `ModelConfig.segments` knows, over all kinds (the command line's schema)."""
    return tuple(sorted(set().union(*_SEGMENT_KIND_DEFAULTS.values())))


def _resolve_segments(value):
    """`segments` as a sorted, hashable tuple of (setting, value) pairs, or None. The settings
    are those of its kind (an ARMT setting given to "rmt" is an error)."""
    if value is None:
        return None
    given = _as_mapping(value, "ModelConfig.segments",
                        "must be None or map settings {kind, length, memory_tokens, bptt, "
                        "replay; armt: d_mem, nu, correction} to values")
    known = segment_setting_names()
    unknown = sorted((k for k in given if k not in known), key=str)
    if unknown:
        raise ValueError(f"ModelConfig.segments.{unknown[0]}: unknown setting; known: "
                         f"{list(known)}")
    kind = given.get("kind", _SEGMENT_DEFAULTS["kind"])
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"ModelConfig.segments.kind: must be one of {SEGMENT_KINDS}, "
                         f"got {kind!r}")
    defaults = _SEGMENT_KIND_DEFAULTS[kind]
    other = sorted((k for k in given if k not in defaults), key=str)
    if other:
        raise ValueError(f"ModelConfig.segments.{other[0]}: a setting of kind 'armt' only "
                         f"(this kind is {kind!r}), got {given[other[0]]!r}")
    s = {**defaults, **given}

    def need(ok, field, msg):
        if not ok:
            raise ValueError(f"ModelConfig.segments.{field}: {msg}, got {s[field]!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    need(s["length"] is not None, "length", "required (tokens per segment)")
    # rmt without memory tokens (0) is the segment-local baseline: no memory at all.
    lows = {"length": 1, "memory_tokens": 0 if kind == "rmt" else 1}
    if kind == "armt":
        lows.update(d_mem=1, nu=1)
    for f, lo in lows.items():
        need(is_int(s[f]), f, "must be an int")
        need(s[f] >= lo, f, f"must be >= {lo}" + (" (ARMT writes its memory from the memory "
                                                   "tokens)" if f == "memory_tokens" else ""))
        need(s[f] <= registry.MAX_INT, f, "must be <= 2**31 - 1")
    if s["bptt"] is not None:
        need(is_int(s["bptt"]), "bptt", "must be None (full) or an int")
        need(s["bptt"] >= 0, "bptt", "must be >= 0")
        need(s["bptt"] <= registry.MAX_INT, "bptt", "must be <= 2**31 - 1")
    need(isinstance(s["replay"], bool), "replay", "must be True or False")
    if kind == "armt":
        need(isinstance(s["correction"], bool), "correction", "must be True or False")
        # DPFP rolls the 2 * d_mem features by 1 .. nu: nu > 2 * d_mem repeats products. The
        # error names the one of the two that was given (nu when both were).
        blame = "nu" if "nu" in given or "d_mem" not in given else "d_mem"
        need(s["nu"] <= 2 * s["d_mem"], blame, f"nu = {s['nu']} must be <= 2 * d_mem = "
             f"{2 * s['d_mem']} (DPFP multiplies the 2 * d_mem features with their rolls by "
             "1 .. nu)")
        blame = "d_mem" if "d_mem" in given or "nu" not in given else "nu"
        need(2 * s["nu"] * s["d_mem"] <= registry.MAX_INT, blame,
             "2 * nu * d_mem (the key features) must be <= 2**31 - 1")
    return tuple(sorted(s.items()))


_SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(Shared))

# Flat ModelConfig fields of older checkpoints -> the mechanisms whose setting they became.
_LEGACY_FIELDS = {
    "window": {"swa": "window"},
    "attn_sinks": {"attn": "sinks", "swa": "sinks"},
    "num_kv_heads": {"attn": "num_kv_heads", "swa": "num_kv_heads"},
    "expand_v": {"gdn": "expand_v", "deltanet": "expand_v"},
    "allow_neg_eigval": {"gdn": "allow_neg_eigval", "deltanet": "allow_neg_eigval"},
    "feature_map": {"la": "feature_map"},
    "feature_dim": {"la": "feature_dim"},
    "gate_rank": {"gla": "gate_rank"},
    "gate_normalizer": {"gla": "gate_normalizer"},
    "mlp_ratio": {"swiglu": "mlp_ratio"},
    "d_ff": {"swiglu": "d_ff"},
    "conv_size": "conv_size",      # every token mixer with convs
    "short_conv": "short_conv",    # None: each mixer's default; a bool: every token mixer
    "use_mlp": None,               # False: channel_pattern ("none",)
}


def _migrate(d: dict, legacy: dict) -> dict:
    mixers = {n: dict(s) for n, s in dict(d.get("mixers") or {}).items()}
    for field, value in legacy.items():
        target = _LEGACY_FIELDS[field]
        if field == "use_mlp":
            if value is False:
                d["channel_pattern"] = ("none",)
        elif isinstance(target, str):
            if value is not None:
                for n in token_mixers():
                    if target in registry.get(n).settings:
                        mixers.setdefault(n, {})[target] = value
        else:
            for n, setting in target.items():
                mixers.setdefault(n, {})[setting] = value
    d["mixers"] = mixers
    return d
