"""Property-based fuzz (hypothesis) of `ModelConfig` construction.

Each example starts from a valid config (random token and channel patterns) and replaces a few
fields -- any of them, `mixers` included -- with random values: valid ones, edge values (0, -1,
2**31, 2**80, 1e308, 5e-324), wrong types (strings, None, lists, dicts, bools where ints or
floats are expected, floats where ints are expected, NaN, inf, complex, bytes). `mixers`
overrides name registered mechanisms of either slot or unknown ones, in dict or pairs form,
with known or unknown fields and values drawn from each setting's schema
(`registry.get(name).settings`) the same way. Every construction must either

  * return a config that is hashable, JSON-serialisable without NaN or inf, holds settings of
    its schema's types, and round-trips through `to_dict` / JSON / `from_dict` and through
    `dataclasses.replace` (`test_construction`), or
  * raise a ValueError whose message starts with the path of a field --
    `ModelConfig.<field>` or `ModelConfig.mixers.<name>[.<field>]` -- that exists (or is the
    unknown name that was given) and that the example changed, or that a check ties to a
    changed field (num_layers to the patterns' lengths, num_heads to d_model, ...).

Nothing else: no TypeError, AttributeError, OverflowError, nothing from inside JAX.

What constructs must also work:

  * `test_extreme_valid_configs_trace`: every value the smallest, the largest (sizes up to
    2**31 - 1, floats up to 1e308) or a middle one of its valid range; each config that
    constructs traces init and a forward abstractly (`jax.eval_shape`: no memory) to logits
    of the right shape, with nothing overflowing inside JAX;
  * `test_valid_configs_run`: tiny configs (one token mixer, d_model 8, one or two layers) from
    the valid ranges; each that constructs really inits and runs a forward on a [1, 5] batch
    to finite logits of the right shape.

Counts, derandomized (the same examples in every run): 400 constructions (milliseconds each),
40 traces (0.1-0.5 s of CPU each) and 5 real models (each compiles its ops eagerly: 3-8 s of CPU
on the 2-core test machine). Few real models, as each costs seconds; the traces check what
validation lets through for many more.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from layers import registry
from mem_lm import LanguageModel, ModelConfig, channel_mixers, token_mixers
from mem_lm.config import DTYPES, IMPLS, REMAT
from pallas_kernels.attention import IMPLS as ATTN_IMPLS

CONSTRUCT_EXAMPLES = 400   # milliseconds each
TRACE_EXAMPLES = 40        # each traces a model abstractly (0.1-0.5 s of CPU)
RUN_EXAMPLES = 5           # each inits and runs a model (3-8 s of CPU)

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

NAN, INF = float("nan"), float("inf")
TOKEN, CHANNEL = token_mixers(), channel_mixers()
MECHANISMS = TOKEN + CHANNEL
BASE = dict(vocab_size=32, d_model=16, num_heads=2)
JUNK = st.sampled_from([None, "", "2", "x", [], [2], (2,), {}, {"x": 1}, NAN, INF, -INF, 1j,
                        b"x", True, False])
BAD_NAMES = st.sampled_from(["", "nope", "GDN", "attn ", 3, None])

ints = st.one_of(st.integers(1, 64), st.sampled_from([0, -1, -7, 2**31, 2**63, 2**80]),
                 st.sampled_from([2.0, 2.5, -1.0]), JUNK)
floats = st.one_of(st.floats(1e-8, 1e6), st.sampled_from([0.0, -0.0, -1.0, 1e308, 5e-324]),
                   st.integers(-2, 4), JUNK)
bools = st.one_of(st.booleans(), st.sampled_from([0, 1, 1.0, "True", None]))


def choices(known):
    return st.one_of(st.sampled_from(known),
                     st.sampled_from([k.upper() for k in known] + ["", "nope", None, 1, list(known[:1])]))


def pattern(slot_names, other_names):
    name = st.one_of(st.sampled_from(slot_names), st.sampled_from(other_names), BAD_NAMES)
    return st.one_of(st.lists(name, max_size=4).flatmap(lambda l: st.sampled_from([l, tuple(l)])),
                     st.sampled_from(slot_names),   # a single name stands for a 1-tuple
                     st.just(()), JUNK)


def setting_value(s: registry.Setting):
    """Valid and invalid values for one mechanism setting, from its schema."""
    if s.type is bool:
        return bools
    if s.type is int:
        return st.one_of(st.integers(-2, 70), st.sampled_from([2**31 - 1, 2**31, 2**63, 10**30]),
                         st.sampled_from([2.0, 2.5]), JUNK)
    if s.type is float:
        return st.one_of(st.floats(-1, 4), st.sampled_from([NAN, INF, -INF, 1e308, 5e-324]),
                         st.integers(-2, 4), JUNK)
    return st.one_of(st.sampled_from([*str_choices(s), "", "nope"]), JUNK)


def draw_valid(draw, setting: registry.Setting, values: dict):
    """A valid value of a setting: one of a str setting's choices, else None (when optional)
    or a draw from values[its type]."""
    if setting.type is str:
        return draw(st.sampled_from(str_choices(setting)))
    return draw(st.none() if setting.optional and draw(st.booleans())
                else values[setting.type])


def str_choices(s: registry.Setting) -> list:
    """The valid values of a str setting: its doc lists them ("one of ('elu', ...)")."""
    return sorted({s.default, *re.findall(r"'(\w+)'", s.doc)})


@st.composite
def overrides_of(draw, name):
    """{field: value} for mechanism `name` (known or not): its own fields, fields of other
    mechanisms and unknown ones."""
    own = registry.get(name).settings if name in MECHANISMS else {}
    # Mostly known fields: one unknown field hides every bad value beside it.
    fields = st.sampled_from(sorted(own) * 4 + ["nope", "", 1]) if own \
        else st.sampled_from(["window", "nope", "", 1])
    out = {}
    for f in draw(st.lists(fields, max_size=3, unique=True)):
        out[f] = draw(setting_value(own[f]) if f in own else st.one_of(st.integers(0, 4), JUNK))
    return draw(st.sampled_from([out, list(out.items())])) if out else out


@st.composite
def mixers_values(draw, used=MECHANISMS):
    """`mixers` values, mostly overriding the mechanisms in `used` (those a config checks)."""
    names = draw(st.lists(st.sampled_from(sorted(used) * 4 + list(MECHANISMS) + ["nope", 3]),
                          max_size=3, unique=True))
    given = {n: draw(st.one_of(overrides_of(n), JUNK)) if draw(st.integers(0, 9)) == 0
             else draw(overrides_of(n)) for n in names}
    return draw(st.sampled_from([given, given, list(given.items())]))  # mostly the dict form


VALUES = {
    "vocab_size": ints, "d_model": ints, "num_layers": ints, "num_heads": ints,
    "head_dim": st.one_of(st.none(), ints), "chunk_size": ints,
    "pattern": pattern(TOKEN, CHANNEL), "channel_pattern": pattern(CHANNEL, TOKEN),
    "mixers": st.one_of(mixers_values(), mixers_values(), mixers_values(), JUNK),
    "rope_theta": floats, "norm_eps": floats, "init_std": floats,
    "tie_embeddings": bools, "scan_layers": bools, "zero_centred_norms": bools,
    "dtype": choices(DTYPES), "remat": choices(REMAT), "impl": choices(IMPLS),
    "attn_impl": choices(ATTN_IMPLS),
    # Segment recurrence: None (off), valid and bad settings, unknown keys, junk.
    "segments": st.one_of(
        st.none(),
        st.dictionaries(st.sampled_from(["kind", "length", "memory_tokens", "bptt", "replay",
                                         "d_mem", "nu", "correction", "nope"]),
                        st.one_of(st.integers(-1, 5), st.none(),
                                  st.sampled_from(["rmt", "armt", "x"]), st.booleans(), JUNK),
                        max_size=5),
        JUNK),
}
FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# The fields a check compares a field with: an error may blame the other one.
RELATED = {"num_layers": {"pattern", "channel_pattern"}, "num_heads": {"d_model", "head_dim"},
           "head_dim": {"d_model", "num_heads", "pattern"},
           "mixers": {"d_model", "num_heads", "head_dim", "pattern", "channel_pattern"}}


@st.composite
def model_kwargs(draw):
    """(kwargs, changed fields): a valid config with a few fields replaced."""
    kw = dict(BASE)
    kw["pattern"] = tuple(draw(st.lists(st.sampled_from(TOKEN), min_size=1, max_size=3)))
    kw["channel_pattern"] = tuple(draw(st.lists(st.sampled_from(CHANNEL), min_size=1, max_size=2)))
    kw["num_layers"] = math.lcm(len(kw["pattern"]), len(kw["channel_pattern"])) * draw(
        st.integers(1, 2))
    # Most examples change `mixers` (checked last, so other errors would hide its own).
    changed = draw(st.one_of(st.sets(st.sampled_from(FIELDS), min_size=1, max_size=4),
                             st.just({"mixers"}),
                             st.sets(st.sampled_from(FIELDS), max_size=1).map({"mixers"}.union)))
    for f in sorted(changed):
        kw[f] = draw(mixers_values(set(kw["pattern"]) | set(kw["channel_pattern"]))
                     if f == "mixers" and draw(st.booleans()) else VALUES[f])
    return kw, changed


def assert_names_a_changed_field(msg: str, kw: dict, changed: set):
    m = re.match(r"ModelConfig\.(\w+)(?:\.([^.:]*)(?:\.([^:]*))?)?: ", msg)
    assert m, f"the error names no ModelConfig field: {msg}"
    field, mech, setting = m.groups()
    event(f"error: {field}{'.' + mech if mech in MECHANISMS else ''}"
          f"{'.' + setting if setting is not None else ''}")
    assert field in FIELDS, msg
    assert field in changed or changed & RELATED.get(field, set()), \
        f"blames {field}, which the example did not change ({sorted(changed)}): {msg}"
    if mech is not None and field == "segments":
        assert mech in ("kind", "length", "memory_tokens", "bptt") or \
            mech in map(str, _as_dict(kw["segments"])), msg
    elif mech is not None:
        assert field == "mixers", msg
        given = _as_dict(kw["mixers"])
        assert mech in MECHANISMS or mech in map(str, given), msg
        if setting is not None:
            own = registry.get(mech).settings if mech in MECHANISMS else {}
            assert setting in own or setting in map(str, _as_dict(given.get(mech))), msg


def _as_dict(value) -> dict:
    """A mapping in dict or pairs form as a dict ({} for anything else)."""
    try:
        return dict(value)
    except (TypeError, ValueError):
        return {}


def test_every_field_is_fuzzed():
    assert set(VALUES) == set(FIELDS)


@settings(FUZZ, max_examples=CONSTRUCT_EXAMPLES)
@given(example=model_kwargs())
def test_construction(example):
    kw, changed = example
    try:
        cfg = ModelConfig(**kw)
    except ValueError as e:
        assert_names_a_changed_field(str(e), kw, changed)
        return
    event("valid")
    hash(cfg)
    text = json.dumps(cfg.to_dict(), allow_nan=False)
    assert ModelConfig.from_dict(json.loads(text)) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(cfg) == cfg
    assert [n for n, _ in cfg.mixers] == sorted(set(cfg.pattern) | set(cfg.channel_pattern))
    for name, values in cfg.mixers:
        schema = registry.get(name).settings
        assert [k for k, _ in values] == sorted(schema)
        for k, v in values:
            assert (v is None and schema[k].optional) or (
                type(v) is schema[k].type), (name, k, v)


@st.composite
def extreme_valid_kwargs(draw):
    """Each value the smallest, the largest or a middle one of its valid range (sizes up to
    2**31 - 1); they may still clash with each other. Loop counts stay small: num_layers and
    conv_size unroll Python loops at trace time."""
    top = registry.MAX_INT
    pattern = tuple(draw(st.lists(st.sampled_from(TOKEN), min_size=1, max_size=2)))
    channel = tuple(draw(st.lists(st.sampled_from(CHANNEL), min_size=1, max_size=2)))
    extremes = {int: st.sampled_from([1, 2, top]),
                float: st.sampled_from([5e-324, 1.0, 2.0, 1e308]), bool: st.booleans()}
    mixers = {}
    for name in set(pattern) | set(channel):
        s = {}
        for f, setting in registry.get(name).settings.items():
            if f == "conv_size":
                s[f] = draw(st.sampled_from([1, 4]))
            else:
                s[f] = draw_valid(draw, setting, extremes)
        mixers[name] = s
    d_model = draw(st.sampled_from([8, 2**20, top]))
    return dict(vocab_size=draw(st.sampled_from([1, 37, top])), d_model=d_model,
                num_layers=math.lcm(len(pattern), len(channel)), pattern=pattern,
                channel_pattern=channel, mixers=mixers,
                num_heads=draw(st.sampled_from([1, 2, d_model])),
                head_dim=draw(st.sampled_from([None, None, 1, 2, 2, 2**30])),
                chunk_size=draw(st.sampled_from([1, 2**30])),
                rope_theta=draw(extremes[float]), norm_eps=draw(extremes[float]),
                init_std=draw(extremes[float]), tie_embeddings=draw(st.booleans()),
                scan_layers=draw(st.booleans()), zero_centred_norms=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)),
                remat=draw(st.sampled_from(REMAT)), impl=draw(st.sampled_from(IMPLS)),
                attn_impl=draw(st.sampled_from(["auto", "reference", "xla"])))


# 1e308 rounds to inf in float32 (init_std, rope_theta), and JAX indexes the 2**31 - 1 rows
# of a vocabulary that size in int32 after asking for int64: the trace checks shapes only.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64:UserWarning")
@settings(FUZZ, max_examples=TRACE_EXAMPLES)
@given(kw=extreme_valid_kwargs())
def test_extreme_valid_configs_trace(kw):
    """What validation lets through builds: init and a forward trace (abstractly: no memory)
    to logits of the right shape, with nothing overflowing inside JAX."""
    cfg = valid_or_named_error(kw)
    if cfg is None:
        return
    model = LanguageModel(cfg)
    tokens = jnp.zeros((1, 5), jnp.int32)
    out = jax.eval_shape(lambda rng: model.apply(model.init(rng, tokens), tokens),
                         jax.random.PRNGKey(0))
    assert out.shape == (1, 5, cfg.vocab_size) and out.dtype == jnp.float32


def valid_or_named_error(kw):
    """The config, or None after checking its ValueError names one of the fields set."""
    try:
        cfg = ModelConfig(**kw)
    except ValueError as e:
        assert_names_a_changed_field(str(e), kw, set(kw))
        return None
    event("valid")
    return cfg


@st.composite
def tiny_valid_kwargs(draw):
    """A tiny config from the valid ranges; values may still clash (expand_v · head_dim not
    an integer)."""
    num_heads = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([None, None, 2, 4]))
    # One token mixer per example: each costs seconds of compilation, so few run in all.
    pattern = (draw(st.sampled_from(TOKEN)),)
    channel = tuple(draw(st.lists(st.sampled_from(CHANNEL), min_size=1, max_size=2)))
    group = math.lcm(len(pattern), len(channel))
    small = {int: st.integers(1, 3), float: st.sampled_from([0.5, 1.0, 2.0]),
             bool: st.booleans()}
    mixers = {}
    for name in set(pattern) | set(channel):
        s = {}
        for f, setting in registry.get(name).settings.items():
            if draw(st.booleans()):
                continue
            if f == "num_kv_heads":
                s[f] = draw(st.sampled_from([None, 1, num_heads]))
            else:
                s[f] = draw_valid(draw, setting, small)
        mixers[name] = s
    # One width and one or two layers: the compiled ops repeat across examples.
    return dict(vocab_size=draw(st.integers(2, 64)), d_model=8, num_layers=group,
                num_heads=num_heads, head_dim=head_dim, pattern=pattern, channel_pattern=channel,
                # chunk_size 1 makes some mixers' eager forward several times slower; the ops'
                # tests cover chunk sizes, this one a partial last chunk (4) and none (64).
                mixers=mixers, chunk_size=draw(st.sampled_from([4, 64])),
                rope_theta=draw(st.sampled_from([1.0, 10000.0, 1e6])),
                tie_embeddings=draw(st.booleans()), scan_layers=draw(st.booleans()),
                zero_centred_norms=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), remat=draw(st.sampled_from(REMAT)),
                impl=draw(st.sampled_from(["auto", "reference", "xla"])),
                attn_impl=draw(st.sampled_from(["auto", "reference", "xla"])),
                norm_eps=draw(st.sampled_from([1e-6, 1e-2])),
                init_std=draw(st.sampled_from([0.02, 0.5])))


@settings(FUZZ, max_examples=RUN_EXAMPLES)
@given(kw=tiny_valid_kwargs())
def test_valid_configs_run(kw):
    cfg = valid_or_named_error(kw)
    if cfg is None:
        return
    model = LanguageModel(cfg)
    tokens = jnp.arange(5, dtype=jnp.int32)[None] % cfg.vocab_size
    variables = model.init(jax.random.PRNGKey(0), tokens)
    logits = model.apply(variables, tokens)
    assert logits.shape == (1, 5, cfg.vocab_size)
    assert bool(jnp.isfinite(logits).all())
