"""The mechanism registry: one place that maps a name to its Flax module, its settings (the
nested config schema `model.mixers.<name>.<field>`), their defaults and value checks.

Two slots of a block take a mechanism:
  token    the mixer (attention, gdn, ...): a module called as
               y, new_cache = m(x, positions=, segment_ids=, cache=, cache_pos=, layer_idx=)
           whose `init_cache(batch, max_len)` is its cache constructor (a pytree of arrays);
  channel  the MLP slot (swiglu, ...): a module called as y = m(x), or None for no MLP.

Each layer file registers its mechanisms at import (`register(Mechanism(...))`);
`layers/__init__.py` imports every layer file, so `import layers` fills the registry. The
model (`mem_lm`), config validation, the trainer's CLI and the eval scripts read it; nothing
else lists mechanism names. Auxiliary outputs (losses, metrics) go through the collections
named here with `Module.sow`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

SLOTS = ("token", "channel")
# Flax collections a mechanism may `sow` into (mem_lm.apply_with_aux collects them; the trainer
# adds the losses to the objective and logs everything). AUX_LOSS: scalars, weighted by the
# mechanism's own settings, summed over the layers that sow them. AUX_POOLED: one vector per
# layer of the statistics of a loss formed over all layers together (Mixtral's load balance
# pools every layer's router): the model stacks each name's vectors to [layers, n] and passes
# them to the function the mechanism declares under that name (`Mechanism.pooled_losses`).
# AUX_METRICS: scalars the trainer only logs, averaged over layers.
AUX_LOSS = "aux_loss"
AUX_POOLED = "aux_pooled"
AUX_METRICS = "aux_metrics"


class SettingError(ValueError):
    """A mechanism setting has a value that cannot work; `field` names it."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of a mechanism's config: its default, its type (int, float, bool or str;
    None is allowed only when `optional`) and what it means."""
    default: Any
    type: type
    doc: str = ""
    optional: bool = False

    def coerce(self, field: str, value):
        if value is None:
            if self.optional:
                return None
            raise SettingError(field, f"must be a {self.type.__name__}, got None")
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise SettingError(field, f"must be finite, got {value!r}") from None
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise SettingError(field, f"must be a {self.type.__name__}"
                                      f"{' or None' if self.optional else ''}, got {value!r}")
        if self.type is float and not math.isfinite(value):
            raise SettingError(field, f"must be finite, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Shared:
    """The model-wide values a mechanism reads (resolved by `mem_lm.ModelConfig.shared`)."""
    d_model: int
    num_heads: int
    head_dim: int
    num_layers: int
    dtype: Any              # compute dtype (params are always float32)
    init_std: float
    norm_eps: float
    impl: str               # recurrent ops' impl
    attn_impl: str          # softmax attention impl
    chunk_size: int
    rope_theta: float
    zero_centred_norms: bool = False   # RMSNorms scale by (1 + w), w from 0 (Qwen3-Next)


Build = Callable[[Shared, Mapping[str, Any], Optional[str]], Any]


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """A registered mechanism.

    build(shared, settings, name) -> the module (named `name`), or None for an empty slot.
    check(shared, settings) raises SettingError for values that cannot work together (the
        types are already checked against `settings`).
    attention_span(settings, seq_len) -> keys each query attends to, for softmax mixers
        (FLOP estimates); None for the rest.
    pooled_losses {name: fn(settings, stats [layers, n]) -> scalar}: the losses formed from the
        AUX_POOLED statistics its layers sow under that name, over all layers together.
    context_parallel (token mixers): whether the full forward runs with T split over the
        mesh's `context` axis (mesh.context > 1; the layer's sequence-mixing ops run inside
        `layers.common.over_context`): True, False (config validation then names the
        mechanism), or fn(settings) -> None when supported, else why not (a str) for settings
        that cannot. Channel mixers are per token and need nothing.
    """
    name: str
    slot: str
    build: Build
    settings: Mapping[str, Setting] = dataclasses.field(default_factory=dict)
    check: Optional[Callable[[Shared, Mapping[str, Any]], None]] = None
    summary: str = ""
    recurrent: bool = False         # a fixed-size state: decoding is O(1) per token
    attention_span: Optional[Callable[[Mapping[str, Any], int], int]] = None
    pooled_losses: Mapping[str, Callable[[Mapping[str, Any], Any], Any]] = dataclasses.field(
        default_factory=dict)
    context_parallel: Any = False

    def context_parallel_error(self, settings: Mapping[str, Any]) -> Optional[str]:
        """None when this mechanism with these settings runs with T split over the context
        axis; else why not."""
        if self.slot == "channel":
            return None
        cp = self.context_parallel
        if callable(cp):
            return cp(settings)
        return None if cp else "its layer has no context-parallel path (Mechanism.context_parallel)"

    def defaults(self) -> dict:
        return {k: s.default for k, s in self.settings.items()}

    def resolve(self, overrides: Mapping[str, Any]) -> dict:
        """The defaults with `overrides` applied; unknown fields and wrong types raise
        SettingError naming the field."""
        unknown = sorted(set(overrides) - set(self.settings), key=str)
        if unknown:
            raise SettingError(unknown[0], f"unknown field of mechanism {self.name!r}; "
                                           f"known: {sorted(self.settings)}")
        return {k: s.coerce(k, overrides.get(k, s.default)) for k, s in self.settings.items()}


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    if mechanism.slot not in SLOTS:
        raise ValueError(f"mechanism {mechanism.name!r}: slot must be one of {SLOTS}")
    if mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism {mechanism.name!r} is registered twice")
    for field, s in mechanism.settings.items():
        s.coerce(field, s.default)   # a default of the wrong type is the registrant's bug
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def unregister(name: str) -> None:
    """Remove a mechanism (tests register throwaway ones)."""
    _REGISTRY.pop(name)


def names(slot: str) -> tuple:
    """Registered names of a slot, in registration order."""
    _load()
    return tuple(n for n, m in _REGISTRY.items() if m.slot == slot)


def get(name: str, slot: Optional[str] = None) -> Mechanism:
    """The mechanism `name`; a ValueError names the known ones when there is none (of `slot`)."""
    _load()
    m = _REGISTRY.get(name)
    if m is None or (slot is not None and m.slot != slot):
        known = names(slot) if slot else tuple(_REGISTRY)
        raise ValueError(f"unknown {slot + ' ' if slot else ''}mechanism {name!r}; "
                         f"known: {known}")
    return m


def _load():
    # The layer files register themselves when imported; importing the package imports them.
    import layers  # noqa: F401


# Sizes and windows meet int32 positions and indices inside JAX (its default integer width).
MAX_INT = 2**31 - 1


def positive_int(settings, *fields):
    """SettingError unless each field is an int in [1, MAX_INT] (None passes for optional
    fields)."""
    for f in fields:
        v = settings[f]
        if v is not None and v < 1:
            raise SettingError(f, f"must be >= 1, got {v!r}")
        if v is not None and v > MAX_INT:
            raise SettingError(f, f"must be <= 2**31 - 1, got {v!r}")


def width_multiplier(settings, field: str, base: int) -> None:
    """SettingError unless settings[field] > 0 makes field · base a whole width <= MAX_INT
    (expand_v: value heads of expand_v · head_dim)."""
    v = settings[field]
    width = base * v
    if not (v > 0 and float(width).is_integer() and width <= MAX_INT):
        raise SettingError(field, f"must be > 0 with {field} · head_dim ({base}) an integer "
                                  f"<= 2**31 - 1, got {v}")


def describe() -> str:
    """A markdown table of every registered mechanism and its settings (defaults)."""
    _load()
    rows = ["| mechanism | slot | settings (default) | what it is |", "|---|---|---|---|"]
    for name, m in _REGISTRY.items():
        fields = ", ".join(f"`{k}` ({s.default!r})" for k, s in m.settings.items()) or "-"
        rows.append(f"| `{name}` | {m.slot} | {fields} | {m.summary} |")
    return "\n".join(rows)
