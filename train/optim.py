"""optax AdamW with linear warmup + cosine decay, global-norm clipping, and no weight decay on
the parameters whose names `optim.no_decay_patterns` matches (norm scales, biases, gate
parameters and gate projections).

Parameter groups by name (`optax.multi_transform`): the parameters whose path matches
`optim.memory_values.patterns` (the memory layers' value tables) get their own AdamW with the
fixed learning rate `optim.memory_values.learning_rate` (no warmup, no decay: Memory+ trains
its values at a constant 1e-3) and weight decay `optim.memory_values.weight_decay`; every
other parameter gets the main one. Clipping is by the global norm over all of them."""
from __future__ import annotations

import re

import jax
import optax
from flax.core import meta


def learning_rate_schedule(optim_cfg) -> optax.Schedule:
    o = optim_cfg
    warmup = int(o.warmup_steps)
    decay = max(int(o.decay_steps) - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else o.learning_rate, peak_value=o.learning_rate,
        warmup_steps=warmup, decay_steps=warmup + decay, end_value=o.learning_rate * o.end_lr_factor)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_box(x) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _regexes(patterns: str, field: str) -> list:
    regexes = []
    for p in patterns.split(","):
        if p.strip():
            try:
                regexes.append(re.compile(p.strip()))
            except re.error as e:
                raise ValueError(f"optim.{field}: {p.strip()!r} is not a regex ({e})") from e
    return regexes


def _by_name(params, fn, boxed: bool = True):
    """fn(path string) at every leaf; with `boxed`, in a box like the leaf's when `params` is
    Flax boxed, else a plain value in place of the whole box."""
    def leaf_fn(path, leaf):
        v = fn(_path_str(path))
        return leaf.replace_boxed(v) if boxed and _is_box(leaf) else v

    return jax.tree_util.tree_map_with_path(leaf_fn, params, is_leaf=_is_box)


def weight_decay_mask(params, patterns: str):
    """True for the params that get weight decay: those whose path ("layer_0/mixer/A_log";
    "groups/block_0/mixer/A_log" under scan_layers) no regex of the comma-separated `patterns`
    matches (re.search). The rule looks at names only, never at ranks, so a parameter is decayed
    or not whether or not `scan_layers` stacks the layers along a leading axis. `params` may be
    Flax boxed (logically partitioned) or plain; the mask has the same tree structure."""
    regexes = _regexes(patterns, "no_decay_patterns")
    return _by_name(params, lambda name: not any(r.search(name) for r in regexes))


MEMORY_VALUES = "memory_values"


def param_groups(params, patterns: str):
    """The optimizer group of each parameter: "memory_values" where its path matches a regex of
    the comma-separated `patterns` (optim.memory_values.patterns), else "default".

    The labels are plain strings, also where `params` is Flax boxed (a label stands for the
    whole box): optax.multi_transform then puts its placeholder for a parameter outside a
    group in place of the box, so a state initialised from boxed params has no boxes without
    arrays (which would each get a sharding) and updates of boxed or plain params line up."""
    regexes = _regexes(patterns, "memory_values.patterns")
    return _by_name(params, lambda name: MEMORY_VALUES if any(r.search(name) for r in regexes)
                    else "default", boxed=False)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    o = optim_cfg
    chain = []
    if o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    main = optax.adamw(learning_rate=learning_rate_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay,
                       mask=lambda p: weight_decay_mask(p, o.no_decay_patterns))
    g = o.memory_values
    values = optax.adamw(learning_rate=g.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
                         weight_decay=g.weight_decay)
    chain.append(optax.multi_transform({"default": main, MEMORY_VALUES: values},
                                       lambda p: param_groups(p, g.patterns)))
    return optax.chain(*chain)
