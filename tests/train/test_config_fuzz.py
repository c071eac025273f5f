"""Property-based fuzz (hypothesis) of the trainer's config: random overrides through
`train.config.resolve`.

Each example takes configs/tiny.py and overrides a few fields of any group (train, optim, data,
mesh, rules, checkpoint, logging, distributed, sample, model, model.mixers.<name>) with values
a JSON config.json or a Python config file can hold: valid ones and values that steer resolve
to its deeper checks (synthetic data sources with small vocabularies and sequence lengths, mesh
shapes, rules, regexes, tokenizer and text paths), edge values (0, -1, 2**31, 2**40), wrong
types (strings, None, lists, dicts, bools where numbers are expected, floats where ints are
expected, NaN, inf); unknown fields and groups, and groups replaced by a value. Every resolve
must either

  * return a config that survives its own JSON (config.json) and resolves to the same config
    again, builds its ModelConfig, its optimizer (on a toy parameter) with a finite learning
    rate schedule, and -- for every data source but the standard library, which takes seconds
    to read -- the first train and validation examples, of train.seq_len tokens inside the
    model's vocabulary (`test_resolve`), or
  * raise a ConfigError whose message starts with `config.<group>.<field>` of a field that
    exists (or is the unknown one that was given), in a group that the example changed or
    that a check ties to one (train.batch_size to the mesh, data.num_kv_pairs to
    train.seq_len, ...).

Nothing else: no TypeError, AttributeError, no error from ml_collections, JAX or the data
generators. `test_valid_configs_train` then trains a few valid draws of tiny models for two
steps (`train.loop.run`, no checkpoints, no TensorBoard) to a finite loss. The command line's
own errors (unknown overrides, values that do not parse) are tested in test_config.py.

Counts, derandomized (the same examples in every run): 400 resolves (milliseconds each) and 3
training runs (each compiles a train step: 4-6 s of CPU on the 2-core test machine).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ml_collections import ConfigDict

from configs import base
from configs.tiny import get_config
from layers import registry
from train import data as data_lib
from train.config import (ConfigError, data_vocab_size, from_json, model_config_from, resolve,
                          to_json)
from train.loop import run
from train.optim import learning_rate_schedule, make_optimizer

RESOLVE_EXAMPLES = 400   # 10-30 ms each
TRAIN_EXAMPLES = 3       # each compiles a train step (4-6 s of CPU)

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

NAN, INF = float("nan"), float("inf")
SCHEMA = base.get_config()
README = str(Path(__file__).resolve().parents[2] / "README.md")
# What a JSON file can hold (json.loads reads NaN and Infinity too).
JUNK = st.sampled_from([None, "", "x", "2", [], [1], {}, {"a": 1}, NAN, INF, -INF, True, False,
                        1.5, 2**31, 2**40, -2**40])
INTS = st.one_of(st.integers(-2, 40), st.sampled_from([2**31 - 1, 2**31]), JUNK)
FLOATS = st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 0.5, 0.9, 1.0, 2.0, -1.0, 1e308]),
                   st.integers(-1, 3), JUNK)
BOOLS = st.one_of(st.booleans(), st.sampled_from([0, 1, "True", None]))
STRINGS = st.one_of(st.sampled_from(["", "x", "byte"]), JUNK)
AXES = st.sampled_from(["", "data", "fsdp", "tensor", "data,fsdp", "fsdp,tensor", "model",
                        "data,,", ["data", "fsdp"], ["tensor"], [], None, 3])

# Values that take resolve past its first checks, by field.
SPECIAL = {
    "data.source": st.one_of(st.sampled_from(base.DATA_SOURCES), STRINGS),
    "data.paths": st.sampled_from(["", README, "/nonexistent/*.txt", "x", README + ",x"]),
    "data.val_paths": st.sampled_from(["", README, "/nonexistent"]),
    "data.tokenizer": st.sampled_from(["byte", "/nonexistent/tokenizer.json", "", README]),
    "data.extensions": st.sampled_from([".md", ".py,.md", "", "md"]),
    "data.vocab_size": st.one_of(st.sampled_from([1, 2, 3, 8, 16, 40, 64, 256]), INTS),
    "data.num_kv_pairs": st.one_of(st.integers(-1, 12), INTS),
    "data.copy_length": st.one_of(st.integers(-1, 16), INTS),
    "data.power_a": st.one_of(st.sampled_from([0.0, 0.01, 1.0, 5.0]), FLOATS),
    "data.val_fraction": st.one_of(st.sampled_from([0.0, 0.5, 0.99, 1.0]), FLOATS),
    "train.compute_dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "float16"]), JUNK),
    "train.seq_len": st.one_of(st.sampled_from([1, 4, 8, 16, 32, 64]), INTS),
    "train.batch_size": st.one_of(st.sampled_from([1, 2, 3, 4, 8, 16]), INTS),
    "optim.no_decay_patterns": st.sampled_from(["", "norm", "norm,(bias", "[", "a|b,c$"]),
    "sample.top_k": st.one_of(st.sampled_from([1, 40, 256, 257]), INTS),
    "sample.prompt": st.sampled_from(["", "def ", "x"]),
    "model.vocab_size": st.one_of(st.sampled_from([-1, 16, 256, 8192]), INTS),
    **{f"model.{f}": st.one_of(st.lists(st.sampled_from(registry.names(slot)), min_size=1,
                                        max_size=2), STRINGS)
       for f, slot in (("pattern", "token"), ("channel_pattern", "channel"))},
    **{f"mesh.{a}": st.one_of(st.sampled_from([-1, 1, 2, 4, 8, 0, -2]), INTS)
       for a in base.MESH_AXES},
}


def leaves(group: ConfigDict, prefix: str = "") -> dict:
    """{dotted path: default} of every leaf under `group`."""
    out = {}
    for key in group.keys():
        value = group[key]
        if isinstance(value, ConfigDict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


PATHS = leaves(SCHEMA)
GROUPS = tuple(SCHEMA.keys())
# Groups whose checks compare their fields with another group's: an error may blame either.
RELATED = {"train": {"mesh", "rules", "data"}, "data": {"train"}, "model": {"data"},
           "mesh": {"train"}, "optim": {"train"}, "sample": {"model", "data"}}


def value_for(path: str):
    if path in SPECIAL:
        return SPECIAL[path]
    if path.startswith("rules."):
        return AXES
    if path.startswith("model.mixers."):
        _, _, name, field = path.split(".")
        kind = registry.get(name).settings[field].type
    else:  # a None default is an unset optional int (model.head_dim)
        kind = int if PATHS[path] is None else type(PATHS[path])
    return {bool: BOOLS, int: INTS, float: FLOATS, str: STRINGS}.get(kind, JUNK)


@st.composite
def overrides(draw):
    """{dotted path: value}: known fields, and now and then an unknown field or group, or a
    group replaced by a value."""
    out = {}
    if draw(st.sampled_from([True, True, False])):
        # A data source with sizes near its limits: the synthetic tasks' checks need them.
        out["data.source"] = draw(st.sampled_from(base.DATA_SOURCES))
        for path, values in (("data.vocab_size", st.sampled_from([2, 3, 8, 12, 16, 40, 256])),
                             ("data.num_kv_pairs", st.sampled_from([-1, 0, 1, 2, 2, 3, 4, 8])),
                             ("data.copy_length", st.sampled_from([-1, 0, 1, 2, 4, 8])),
                             ("train.seq_len", st.sampled_from([1, 8, 12, 16, 24, 32, 64])),
                             ("data.paths", st.just(README))):
            if path.startswith("data.") or draw(st.booleans()):
                out[path] = draw(values)
    for _ in range(draw(st.integers(0, 2) if out else st.integers(1, 3))):
        kind = draw(st.sampled_from(["unknown field", "unknown group", "group value",
                                     "unknown setting"] + ["field"] * 36))
        if kind == "unknown field":
            group = draw(st.sampled_from(GROUPS))
            out[f"{group}.{draw(st.sampled_from(['stepz', 'nope', 'windw']))}"] = draw(INTS)
        elif kind == "unknown group":
            out[draw(st.sampled_from(["trian", "nope"]))] = {}
        elif kind == "group value":
            out[draw(st.sampled_from(GROUPS))] = draw(st.one_of(JUNK, st.just({})))
        elif kind == "unknown setting":
            out[f"model.mixers.{draw(st.sampled_from(['nope', 'swa']))}.windw"] = 3
        else:
            path = draw(st.sampled_from(sorted(PATHS)))
            out[path] = draw(value_for(path))
    return out


def apply(overrides: dict) -> ConfigDict:
    """configs/tiny.py with the overrides applied, as a config.json would give it."""
    d = json.loads(to_json(get_config()))
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return ConfigDict(d)


def assert_names_a_changed_field(msg: str, changed: dict):
    m = re.match(r"config\.([^\s:]+): ", msg)
    assert m, f"the error names no config field: {msg}"
    path = m[1]
    event(f"error: {'.'.join(path.split('.')[:3 if path.startswith('model.mixers') else 2])}")
    group = path.split(".")[0]
    touched = {p.split(".")[0] for p in changed}
    assert group in touched or touched & RELATED.get(group, set()), \
        f"blames {path}, in a group the example did not change ({sorted(changed)}): {msg}"
    given = any(p == path or p.startswith(path + ".") or path.startswith(p + ".")
                for p in changed)
    assert given or path in PATHS or path in GROUPS or \
        (path.startswith("model.") and _model_field(path[len("model."):])), msg


def _model_field(path: str) -> bool:
    """Whether ModelConfig has the field `path` (e.g. "num_heads", "mixers.swa.window")."""
    parts = path.split(".")
    if parts[0] != "mixers":
        return len(parts) == 1 and f"model.{parts[0]}" in PATHS
    return len(parts) == 1 or (parts[1] in registry.names("token") + registry.names("channel")
                               and (len(parts) == 2 or parts[2] in registry.get(parts[1]).settings))


@settings(FUZZ, max_examples=RESOLVE_EXAMPLES)
@given(changed=overrides(), num_devices=st.sampled_from([1, 2, 8]))
def test_resolve(changed, num_devices):
    try:
        r = resolve(apply(changed), num_devices=num_devices)
    except ConfigError as e:
        assert_names_a_changed_field(str(e), changed)
        return
    event(f"valid: {r.data.source}")
    text = to_json(r)
    assert json.loads(to_json(resolve(from_json(text), num_devices=num_devices))) == json.loads(text)
    model_cfg = model_config_from(r)
    assert model_cfg.vocab_size >= data_vocab_size(r)
    opt = make_optimizer(r.optim)
    opt.init({"w": jnp.zeros(2)})
    lr = learning_rate_schedule(r.optim)
    for step in (0, r.optim.warmup_steps, r.train.steps):
        value = float(lr(step))
        assert math.isfinite(value) and value >= 0, (step, value)
    if r.data.source != "stdlib":  # the standard library takes seconds to read
        for split in ("train", "val"):
            ex = data_lib.make_source(r, split)[0]
            assert ex["inputs"].shape == (r.train.seq_len,)
            assert 0 <= ex["inputs"].min() and ex["inputs"].max() < model_cfg.vocab_size
            assert 0 <= ex["targets"].min() and ex["targets"].max() < model_cfg.vocab_size


@st.composite
def trainable_overrides(draw):
    """Overrides of a cheap run: two steps of the cheapest model to compile (the trainer's
    settings are under test here; tests/mem_lm/test_model_config_fuzz.py runs the mixers)."""
    return {
        "model": json.loads(to_json(base.model_config(
            d_model=8, num_layers=1, num_heads=draw(st.sampled_from([1, 2])), pattern=("attn",),
            channel_pattern=("none",)))),
        "train.steps": 2, "train.eval_every": 0, "train.log_every": 1,
        "train.batch_size": draw(st.sampled_from([2, 4])),
        "train.grad_accum_steps": draw(st.sampled_from([1, 2])),
        "train.seq_len": draw(st.sampled_from([8, 16])),
        "train.eval_batches": draw(st.sampled_from([0, 1])),
        "train.compute_dtype": draw(st.sampled_from(["float32", "bfloat16"])),
        "train.seed": draw(st.integers(0, 2**31 - 1)),
        "data.source": draw(st.sampled_from(["mqar", "copy", "assoc_recall", "text"])),
        "data.paths": README, "data.vocab_size": draw(st.sampled_from([16, 32])),
        "data.num_kv_pairs": draw(st.integers(1, 3)), "data.copy_length": draw(st.integers(1, 3)),
        "optim.learning_rate": draw(st.sampled_from([1e-3, 1.0])),
        "optim.warmup_steps": draw(st.integers(0, 3)),
        "optim.grad_clip_norm": draw(st.sampled_from([0.0, 1.0])),
        "optim.weight_decay": draw(st.sampled_from([0.0, 0.1])),
        "checkpoint.enabled": False, "logging.tensorboard": False, "logging.progress_bar": False,
    }


@settings(FUZZ, max_examples=TRAIN_EXAMPLES)
@given(changed=trainable_overrides())
def test_valid_configs_train(changed):
    config = apply(changed)
    try:
        resolve(config, num_devices=1)
    except ConfigError as e:
        assert_names_a_changed_field(str(e), changed)
        return
    event(f"trained: {config.data.source}")
    with tempfile.TemporaryDirectory() as workdir:
        result = run(config, workdir)
    assert result["step"] == 2 and np.isfinite(result["loss"]), result
