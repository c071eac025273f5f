"""Config validation and resolution, before anything compiles.

`validate(config)` raises `ConfigError` (a ValueError) whose message starts with the dotted name
of the offending field, e.g. ``config.train.batch_size: 12 is not divisible by ...``.
`resolve(config, num_devices, process_count)` returns a validated copy with every derived value
filled in (mesh -1, model.vocab_size -1, optim.decay_steps -1); that copy is what lands in
WORKDIR/config.json and in every checkpoint.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from typing import Any

from ml_collections import ConfigDict

from configs import base as base_config
from train.tasks.mqar import check_mqar_args
from train.tasks.niah import niah_vocab
from train.tasks.segment_recall import check_segment_recall_args


class ConfigError(ValueError):
    """A config field is unknown or has a value that cannot work; the message names the field."""


def _fail(field: str, msg: str):
    raise ConfigError(f"config.{field}: {msg}")


def unknown_field(name: str, group: ConfigDict) -> str:
    """The message for `config.<name>`, which `group` (its parent in the schema) lacks."""
    key = name.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, list(group.keys()), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    parent = name.rpartition(".")[0]
    return (f"unknown field{hint}; known fields of config{'.' * bool(parent)}{parent}: "
            f"{sorted(group.keys())}")


def check_override(path: str, schema: ConfigDict | None = None) -> None:
    """ConfigError unless `config.<path>` (a command-line override) is a field of the schema."""
    node = base_config.get_config() if schema is None else schema
    done = ""
    for key in path.split("."):
        name = f"{done}.{key}" if done else key
        if done == "model.segments" and node is None:
            # None in the schema, a dict where a config file sets it (configs/rmt_small.py):
            # its settings are ModelConfig's, whether or not this config file sets them.
            node = _segment_settings_schema()
        if not isinstance(node, ConfigDict):
            _fail(name, f"unknown field: config.{done} is a value, not a group of fields")
        if key not in node:
            _fail(name, unknown_field(name, node))
        node, done = node[key], name


def _segment_settings_schema() -> ConfigDict:
    """model.segments' fields (every kind's: kind, length, memory_tokens, bptt, replay; armt's
    d_mem, nu, correction) as a group, for check_override: taken from ModelConfig, so a new
    setting is known here too."""
    from mem_lm.config import segment_setting_names

    return ConfigDict({k: 0 for k in segment_setting_names()})


def _check_known_fields(config: ConfigDict, schema: ConfigDict, prefix: str = ""):
    """Unknown, missing and non-group fields where the schema has a group, and leaves of the
    wrong type (a JSON config or a Python file can hold anything)."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            _fail(name, unknown_field(name, schema))
        if isinstance(schema[key], ConfigDict):
            if not isinstance(config[key], ConfigDict):
                _fail(name, f"must be a group of fields, got {config[key]!r}")
            if name != "model":  # ModelConfig checks its own fields (and moves legacy ones)
                _check_known_fields(config[key], schema[key], name + ".")
        elif prefix != "rules.":  # a rule may also be a list of axes or None (parse_rule)
            _check_type(name, config[key], schema[key])
    for key in schema.keys():
        if key not in config:
            _fail(f"{prefix}{key}", "missing (start experiment files from configs/base.py get_config())")


def _check_type(name: str, value, default) -> None:
    """`value` must have the type of the schema's `default` (an int is a float too); numbers
    must fit float32 and int32, in which JAX computes."""
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        shown = value.to_dict() if isinstance(value, ConfigDict) else value
        _fail(name, f"must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {shown!r}")
    if kind is float and not (_finite(value) and abs(value) <= _FLOAT32_MAX):
        _fail(name, f"must be finite in float32 (|x| <= 3.4e38), got {value!r}")
    if kind is int and abs(value) > _INT32_MAX:
        _fail(name, f"must be between -(2**31 - 1) and 2**31 - 1, got {value!r}")


_TYPE_NAMES = {bool: "True or False", int: "an int", float: "a number", str: "a string"}
# JAX computes in 32 bits: steps, seeds and sizes in int32, schedules and the model in float32.
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = 3.4028234663852886e38


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:   # an int beyond float range
        return False


def parse_rule(value: str) -> str | tuple[str, ...] | None:
    """'' -> None, 'fsdp' -> 'fsdp', 'data,fsdp' -> ('data', 'fsdp')."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        parts = [str(v) for v in value if v]
    else:
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else tuple(parts)


def logical_axis_rules(config: ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The config's `rules` group as flax logical axis rules, `memory` first.

    When two logical axes of one array map to the same mesh axis, flax gives it to the
    earlier rule, and a ConfigDict lists its keys sorted (heads before memory). A per-memory
    kernel [embed, memory, heads, kv] should be split by memory (each device holds whole
    memories), so `memory` takes precedence; arrays without a memory axis are unaffected."""
    names = sorted(config.rules.keys(), key=lambda n: n != "memory")
    return tuple((name, parse_rule(config.rules[name])) for name in names)


def resolve_mesh_shape(mesh_cfg, num_devices: int, process_count: int = 1) -> tuple[int, ...]:
    """(data, fsdp, tensor, context) with -1 filled."""
    sizes = {a: int(mesh_cfg[a]) for a in base_config.MESH_AXES}
    for a, s in sizes.items():
        if s == 0 or s < -1:
            _fail(f"mesh.{a}", f"must be a positive size or -1 (fill), got {s}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        _fail(f"mesh.{fill[1]}", f"only one mesh axis may be -1, got -1 for {fill}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            _fail(f"mesh.{fill[0]}", f"-1 cannot fill: the other axes use {fixed} devices, which does "
                                     f"not divide the {num_devices} available")
        sizes[fill[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    shape = tuple(sizes[a] for a in base_config.MESH_AXES)
    if total > num_devices:
        _fail("mesh", f"shape ({', '.join(base_config.MESH_AXES)}) = {shape} needs {total} devices, "
                      f"only {num_devices} exist")
    if process_count > 1 and total != num_devices:
        _fail("mesh", f"shape {shape} uses {total} of {num_devices} devices; a multi-process run must "
                      f"use them all")
    return shape


def _model_config_cls():
    from mem_lm import ModelConfig
    return ModelConfig


def model_config_from(config: ConfigDict):
    """`mem_lm.ModelConfig` from the config's model group (after resolve)."""
    return _model_config_cls().from_dict(config.model.to_dict())


# ModelConfig fields that choose how the model runs, not what its parameters are.
_RUNTIME_FIELDS = ("dtype", "remat", "impl", "attn_impl", "chunk_size", "init_std")


def _check_init_from(path: str, model_cfg) -> None:
    """train.init_from must hold a checkpoint whose parameters fit config.model."""
    from mem_lm.pretrained import PARAMS_ITEM, checkpoint_steps, read_meta
    steps = [path] if os.path.isdir(os.path.join(path, PARAMS_ITEM)) else checkpoint_steps(path)
    if not steps:
        _fail("train.init_from", f"{path!r} holds no checkpoint (a workdir, its checkpoints "
                                 f"directory or one step directory)")
    try:
        theirs = read_meta(steps[0])["model_config"]
    except (OSError, ValueError, KeyError) as e:
        _fail("train.init_from", f"{steps[0]}: no model config in its metadata ({e})")
    ours = model_cfg.to_dict()
    theirs = type(model_cfg).from_dict(theirs).to_dict()
    diff = [f"model.{k}: {ours[k]!r} here, {theirs[k]!r} there" for k in sorted(ours)
            if k not in _RUNTIME_FIELDS and ours[k] != theirs[k]]
    if diff:
        _fail("train.init_from", f"{steps[0]} holds another model than config.model:\n  "
                                 + "\n  ".join(diff))


def data_vocab_size(config: ConfigDict) -> int:
    src = config.data.source
    if src in ("mqar", "copy", "assoc_recall", "niah", "segment_recall"):
        return int(config.data.vocab_size)
    from train.data import make_tokenizer
    return make_tokenizer(config.data.tokenizer).vocab_size


def validate(config: ConfigDict, num_devices: int | None = None, process_count: int = 1) -> None:
    """Raise ConfigError naming the field if the config cannot run. Checks the mesh against
    `num_devices` when given."""
    resolve(config, num_devices=num_devices, process_count=process_count)


def resolve(config: ConfigDict, num_devices: int | None = None, process_count: int = 1) -> ConfigDict:
    schema = base_config.get_config()
    _check_known_fields(config, schema)
    c = ConfigDict(config.to_dict())  # unlocked deep copy

    t = c.train
    for f in ("steps", "batch_size", "seq_len", "log_every", "grad_accum_steps",
              "max_consecutive_nonfinite"):
        if not isinstance(t[f], int) or t[f] < 1:
            _fail(f"train.{f}", f"must be a positive integer, got {t[f]!r}")
    for f in ("eval_every", "checkpoint_every", "eval_batches", "seed"):
        if not isinstance(t[f], int) or t[f] < 0:
            _fail(f"train.{f}", f"must be an integer >= 0, got {t[f]!r}")
    if t.compute_dtype not in ("float32", "bfloat16"):
        _fail("train.compute_dtype", f"must be 'float32' or 'bfloat16', got {t.compute_dtype!r}")
    if t.batch_size % t.grad_accum_steps:
        _fail("train.batch_size", f"{t.batch_size} is not divisible by train.grad_accum_steps="
                                  f"{t.grad_accum_steps}")
    if t.batch_size % process_count:
        _fail("train.batch_size", f"{t.batch_size} is not divisible by the {process_count} processes")

    o = c.optim
    if not o.learning_rate > 0:
        _fail("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    for f in ("warmup_steps",):
        if o[f] < 0:
            _fail(f"optim.{f}", f"must be >= 0, got {o[f]}")
    if o.decay_steps == -1:
        o.decay_steps = t.steps
    if o.decay_steps < 1:
        _fail("optim.decay_steps", f"must be >= 1 or -1 (= train.steps), got {o.decay_steps}")
    for f in ("weight_decay", "grad_clip_norm", "end_lr_factor", "eps"):
        if o[f] < 0:
            _fail(f"optim.{f}", f"must be >= 0, got {o[f]}")
    for f in ("b1", "b2"):
        if not 0 <= o[f] < 1:
            _fail(f"optim.{f}", f"must be in [0, 1), got {o[f]}")
    for field, patterns in (("no_decay_patterns", o.no_decay_patterns),
                            ("memory_values.patterns", o.memory_values.patterns)):
        for p in patterns.split(","):
            try:
                re.compile(p.strip())
            except re.error as e:
                _fail(f"optim.{field}", f"{p.strip()!r} is not a regex ({e})")
    if not o.memory_values.learning_rate > 0:
        _fail("optim.memory_values.learning_rate",
              f"must be > 0, got {o.memory_values.learning_rate}")
    if o.memory_values.weight_decay < 0:
        _fail("optim.memory_values.weight_decay",
              f"must be >= 0, got {o.memory_values.weight_decay}")

    d = c.data
    if d.source not in base_config.DATA_SOURCES:
        _fail("data.source", f"{d.source!r} is not one of {base_config.DATA_SOURCES}")
    if d.source == "text" and not d.paths:
        _fail("data.paths", "data.source='text' needs paths (files, directories or globs, comma-separated)")
    if d.source == "text":
        from train.data import expand_paths
        for field in ("paths", "val_paths"):
            try:
                if d[field] and not expand_paths(d[field], d.extensions):
                    _fail(f"data.{field}", f"no files with extensions {d.extensions!r} under {d[field]!r}")
            except ValueError as e:
                if isinstance(e, ConfigError):
                    raise
                _fail(f"data.{field}", str(e))
    if not 0 <= d.val_fraction < 1:
        _fail("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if d.num_workers < 0:
        _fail("data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.source in ("mqar", "assoc_recall", "niah") and d.num_kv_pairs < 1:
        _fail("data.num_kv_pairs", f"must be >= 1, got {d.num_kv_pairs}")
    if d.source == "copy":
        if d.copy_length < 1:
            _fail("data.copy_length", f"must be >= 1, got {d.copy_length}")
        if d.vocab_size < 3:
            _fail("data.vocab_size", f"copy needs a separator and tokens from 2 up, so >= 3, "
                                     f"got {d.vocab_size}")
    if d.source in ("mqar", "assoc_recall"):
        need = 2 * d.num_kv_pairs + (d.num_kv_pairs if d.source == "assoc_recall" else 2)
        if need > t.seq_len:
            _fail("data.num_kv_pairs", f"{d.num_kv_pairs} pairs do not fit train.seq_len={t.seq_len}")
        if d.vocab_size < 4 * d.num_kv_pairs:
            _fail("data.vocab_size", f"{d.vocab_size} is too small for {d.num_kv_pairs} distinct keys and values")
    if d.source == "mqar":
        try:
            check_mqar_args(d.vocab_size, t.seq_len, d.num_kv_pairs, d.power_a)
        except ValueError as e:
            arg = re.search(r"`(\w+)`", str(e))[1]
            _fail(f"{'train' if arg == 'seq_len' else 'data'}.{arg}", str(e))
    if d.source == "niah":
        try:
            keys = niah_vocab(d.vocab_size)["keys"]
        except ValueError as e:
            _fail("data.vocab_size", str(e))
        if not 1 <= d.num_kv_pairs <= keys[1] - keys[0]:
            _fail("data.num_kv_pairs", f"niah needs 1 to {keys[1] - keys[0]} needles for "
                                       f"data.vocab_size={d.vocab_size}, got {d.num_kv_pairs}")
        if 3 * d.num_kv_pairs + 2 > t.seq_len:
            _fail("data.num_kv_pairs", f"{d.num_kv_pairs} needles do not fit train.seq_len={t.seq_len}")
    if d.source == "segment_recall":
        if d.num_kv_pairs < 1:
            _fail("data.num_kv_pairs", f"must be >= 1 (facts per segment), got {d.num_kv_pairs}")
        for f in ("segment_len", "distance", "max_distance"):
            if d[f] < 0:
                _fail(f"data.{f}", f"must be >= 0, got {d[f]}")
        if d.segment_len == 0:
            seg = c.model.get("segments") if "model" in c else None
            length = seg.get("length") if isinstance(seg, ConfigDict) else None
            if not isinstance(length, int) or isinstance(length, bool) or length < 1:
                _fail("data.segment_len", "0 takes model.segments.length, but the model has no "
                                          "segments; set the segment length")
            d.segment_len = length
        try:
            check_segment_recall_args(d.vocab_size, t.seq_len, d.segment_len, d.num_kv_pairs,
                                      d.distance or None, d.max_distance or None)
        except ValueError as e:
            arg = re.search(r"`(\w+)`", str(e))[1]
            arg = {"facts_per_segment": "num_kv_pairs"}.get(arg, arg)
            _fail(f"{'train' if arg == 'seq_len' else 'data'}.{arg}", str(e))
    if d.source == "copy" and 2 * d.copy_length + 2 > t.seq_len:
        _fail("data.copy_length", f"{d.copy_length} needs seq_len >= {2 * d.copy_length + 2}, "
                                  f"got train.seq_len={t.seq_len}")
    try:
        vocab = data_vocab_size(c)
    except (OSError, ValueError, ImportError) as e:
        _fail("data.tokenizer", str(e))
    if "vocab_size" not in c.model:
        _fail("model.vocab_size", "missing (-1: the data's vocabulary)")
    if c.model.vocab_size == -1:
        c.model.vocab_size = vocab
    elif not isinstance(c.model.vocab_size, int) or isinstance(c.model.vocab_size, bool):
        _fail("model.vocab_size", f"must be an int (-1: the data's vocabulary), "
                                  f"got {c.model.vocab_size!r}")
    elif c.model.vocab_size < vocab:
        _fail("model.vocab_size", f"{c.model.vocab_size} is smaller than the data's vocabulary ({vocab})")

    for name in c.rules.keys():
        if name not in base_config.LOGICAL_AXES:
            _fail(f"rules.{name}", f"unknown logical axis; known: {base_config.LOGICAL_AXES}")
        r = parse_rule(c.rules[name])
        for axis in (r,) if isinstance(r, str) else (r or ()):
            if axis not in base_config.MESH_AXES:
                _fail(f"rules.{name}", f"{axis!r} is not a mesh axis {base_config.MESH_AXES}")

    if num_devices is not None:
        shape = resolve_mesh_shape(c.mesh, num_devices, process_count)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = shape
        batch_axes = parse_rule(c.rules.batch)
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else (batch_axes or ())
        dp = math.prod(dict(zip(base_config.MESH_AXES, shape))[a] for a in batch_axes)
        micro = t.batch_size // t.grad_accum_steps
        if micro % dp:
            what = "train.batch_size" if t.grad_accum_steps == 1 else \
                f"train.batch_size / train.grad_accum_steps = {micro}"
            _fail("train.batch_size", f"{what} is not divisible by the batch axes "
                                      f"{'*'.join(f'mesh.{a}' for a in batch_axes)} = {dp}")

    try:
        model_cfg = model_config_from(c)
    except ValueError as e:
        # ModelConfig names the field as "ModelConfig.<path>: ..."; here it is config.model.<path>.
        field, _, msg = str(e).partition(": ")
        if field.startswith("ModelConfig."):
            _fail("model." + field[len("ModelConfig."):], msg)
        _fail("model", str(e))
    _check_context(c, model_cfg)
    if t.init_from:
        _check_init_from(t.init_from, model_config_from(c))

    if c.checkpoint.keep < 1:
        _fail("checkpoint.keep", f"must be >= 1, got {c.checkpoint.keep}")
    if c.logging.peak_tflops < 0:
        _fail("logging.peak_tflops", f"must be >= 0 (0: a table by device kind), got {c.logging.peak_tflops}")
    if c.distributed.num_processes == 0 or c.distributed.num_processes < -1:
        _fail("distributed.num_processes", f"must be >= 1 or -1 (auto), got {c.distributed.num_processes}")
    if c.distributed.process_id < -1:
        _fail("distributed.process_id", f"must be >= 0 or -1 (auto), got {c.distributed.process_id}")
    s = c.sample
    if s.enabled:
        if not s.prompt:
            _fail("sample.prompt", "must not be empty")
        if s.max_new_tokens < 0:
            _fail("sample.max_new_tokens", f"must be >= 0, got {s.max_new_tokens}")
        if s.temperature < 0:
            _fail("sample.temperature", f"must be >= 0, got {s.temperature}")
        if not 1 <= s.top_k <= c.model.vocab_size:
            _fail("sample.top_k", f"must be in [1, model.vocab_size = {c.model.vocab_size}], got {s.top_k}")
    return c


def _check_context(c: ConfigDict, model_cfg) -> None:
    """mesh.context > 1 (T split over that many devices): the sequence splits into equal
    slices, the batches' and activations' T axis (rules.length) is the context axis, and every
    part of the model has a context-parallel path (Mechanism.context_parallel)."""
    context = c.mesh.context
    if not isinstance(context, int) or isinstance(context, bool):
        return      # the mesh checks name it
    as_axes = lambda r: (r,) if isinstance(r, str) else tuple(r or ())
    if "context" in as_axes(parse_rule(c.rules.batch)):
        _fail("rules.batch", "'context' is the sequence axis (rules.length), not a batch axis")
    if context <= 1:
        return      # -1 resolves once the device count is known; bad sizes: resolve_mesh_shape
    if as_axes(parse_rule(c.rules.length)) != ("context",):
        _fail("rules.length", f"must be 'context' when mesh.context = {context} > 1 (the "
                              f"batches' T axis is split over it), got {c.rules.length!r}")
    if c.train.seq_len % context:
        _fail("train.seq_len", f"{c.train.seq_len} is not divisible by mesh.context = {context} "
                               f"(each device takes an equal contiguous slice)")
    for field, why in model_cfg.context_parallel_errors():
        _fail(f"model.{field}", f"does not support mesh.context > 1 ({why})")


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ConfigDict:
    return ConfigDict(json.loads(text))
