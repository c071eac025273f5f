"""optax AdamW with linear warmup + cosine decay, global-norm clipping, and no weight decay on
norms, biases, gates and other 1-D parameters."""
from __future__ import annotations

import re

import jax
import optax


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


def weight_decay_mask(params, patterns: str):
    """True for params that get weight decay: at least 2-D and no path match of `patterns`."""
    regexes = [re.compile(p.strip()) for p in patterns.split(",") if p.strip()]

    def decays(path, leaf):
        name = _path_str(path)
        return getattr(leaf, "ndim", 0) >= 2 and not any(r.search(name) for r in regexes)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    o = optim_cfg
    chain = []
    if o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    chain.append(optax.adamw(learning_rate=learning_rate_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay,
                             mask=lambda p: weight_decay_mask(p, o.no_decay_patterns)))
    return optax.chain(*chain)
