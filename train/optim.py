"""optax AdamW with linear warmup + cosine decay, global-norm clipping, and no weight decay on
the parameters whose names `optim.no_decay_patterns` matches (norm scales, biases, gate
parameters and gate projections).

Parameter groups by name (`optax.multi_transform`): the parameters whose path matches
`optim.memory_values.patterns` (the memory layers' value tables) get their own AdamW, every
other parameter the main one. By default the value group is the Memory+ reference code's
(facebookresearch/memory: `lingua/optim.py` `build_optimizer`, `apps/main/train.py`): its own
peak rate `optim.memory_values.learning_rate` (the reference's `value_fixed_lr`, 1e-3) under
the same warmup + cosine as the rest (the reference's one LambdaLR scales every group's rate),
the main weight decay (`decay_like_main`: the reference has one weight decay for every group),
and its gradients clipped by their own global norm, the rest by theirs (`separate_clip`: the
reference clips `pk_value_param`s apart, both at `optim.clip`). `follow_schedule=False`,
`decay_like_main=False` with `memory_values.weight_decay`, and `separate_clip=False` give a
constant rate, a decay of its own and one clip over all parameters (this project's earlier
setting, which the README's phonebook result used)."""
from __future__ import annotations

import re

import jax
import optax
from flax.core import meta


def learning_rate_schedule(optim_cfg, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to `peak` (default optim.learning_rate), then cosine decay to
    peak · end_lr_factor. Linear in the peak, so any group's schedule is the main one scaled."""
    o = optim_cfg
    peak = o.learning_rate if peak is None else peak
    warmup = int(o.warmup_steps)
    decay = max(int(o.decay_steps) - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak,
        warmup_steps=warmup, decay_steps=warmup + decay, end_value=peak * o.end_lr_factor)


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
    g = o.memory_values
    clip = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
    main = optax.adamw(learning_rate=learning_rate_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay,
                       mask=lambda p: weight_decay_mask(p, o.no_decay_patterns))
    values = optax.adamw(
        learning_rate=learning_rate_schedule(o, g.learning_rate) if g.follow_schedule
        else g.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=o.weight_decay if g.decay_like_main else g.weight_decay)
    labels = lambda p: param_groups(p, g.patterns)
    if g.separate_clip:
        # Inside multi_transform each clip sees only its group's gradients: two global norms.
        return optax.multi_transform({"default": optax.chain(*clip, main),
                                      MEMORY_VALUES: optax.chain(*clip, values)}, labels)
    return optax.chain(*clip, optax.multi_transform({"default": main, MEMORY_VALUES: values},
                                                    labels))
