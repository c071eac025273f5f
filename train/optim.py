"""optax AdamW with linear warmup + cosine decay, global-norm clipping, and no weight decay on
the parameters whose names `optim.no_decay_patterns` matches (norm scales, biases, gate
parameters and gate projections)."""
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


def weight_decay_mask(params, patterns: str):
    """True for the params that get weight decay: those whose path ("layer_0/mixer/A_log";
    "groups/block_0/mixer/A_log" under scan_layers) no regex of the comma-separated `patterns`
    matches (re.search). The rule looks at names only, never at ranks, so a parameter is decayed
    or not whether or not `scan_layers` stacks the layers along a leading axis. `params` may be
    Flax boxed (logically partitioned) or plain; the mask has the same tree structure."""
    regexes = []
    for p in patterns.split(","):
        if p.strip():
            try:
                regexes.append(re.compile(p.strip()))
            except re.error as e:
                raise ValueError(f"optim.no_decay_patterns: {p.strip()!r} is not a regex ({e})") from e

    def decays(path, leaf):
        decayed = not any(r.search(_path_str(path)) for r in regexes)
        return leaf.replace_boxed(decayed) if _is_box(leaf) else decayed

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=_is_box)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    o = optim_cfg
    chain = []
    if o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    chain.append(optax.adamw(learning_rate=learning_rate_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay,
                             mask=lambda p: weight_decay_mask(p, o.no_decay_patterns)))
    return optax.chain(*chain)
