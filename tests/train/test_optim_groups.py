"""Optimizer groups by name: the memory layers' value tables get their own AdamW
(optim.memory_values: by default the Memory+ reference code's: own peak rate under the main
schedule, the main weight decay, their own gradient clip), every other parameter the main one."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from mem_lm import LanguageModel, ModelConfig
from train.config import ConfigError, resolve
from train.optim import make_optimizer, param_groups
from train.sharding import logical_to_shardings, make_mesh


def test_value_tables_form_their_own_group_with_and_without_scan():
    cfg = ModelConfig(vocab_size=16, d_model=8, num_layers=2, num_heads=2, pattern=("attn",),
                      channel_pattern=("pkm", "memory_plus"),
                      mixers={"pkm": dict(n_keys=4, topk=2, k_dim=4),
                              "memory_plus": dict(n_keys=4, topk=2)})
    patterns = get_config().optim.memory_values.patterns
    for scan in (False, True):
        boxed = jax.eval_shape(LanguageModel(dataclasses.replace(cfg, scan_layers=scan)).init,
                               jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
        labels = param_groups(boxed, patterns)
        assert nn.meta.unbox(labels) == param_groups(nn.meta.unbox(boxed), patterns)
        flat = {jax.tree_util.keystr(k): v
                for k, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(labels))}
        values = sorted(k for k, v in flat.items() if v == "memory_values")
        pkm = "['groups']['block_0']" if scan else "['layer_0']"
        assert values == sorted([f"{pkm}['mlp']['values']", "['memory_values']"]), values
        assert sum(v == "default" for v in flat.values()) == len(flat) - 2
        # The trainer initialises the state from boxed params and shards it by its logical
        # axes: the two groups' states must line up with their shardings (a box around a
        # group's placeholder for a parameter outside it would not).
        state = jax.eval_shape(make_optimizer(get_config().optim).init, boxed)
        mesh = make_mesh((1, 1, 1))
        jax.tree.map(lambda a, s: None, nn.meta.unbox(state),
                     logical_to_shardings(state, mesh, get_config()))


def _adamw_oracle(o, params, grads_per_step):
    """Float64 NumPy AdamW over the steps, written from the Memory+ reference code's rule
    (facebookresearch/memory: lingua/optim.py, apps/main/train.py) for the default options and
    from this project's earlier one for the others. Group "values" is every leaf whose name
    contains 'values'; the main group decays only the 'kernel' leaves here (no_decay_patterns
    exempts the norm scale)."""
    g = o.memory_values

    def lr_factor(step):        # the reference's lr_cosine: warmup, then cosine to min_ratio
        if step < o.warmup_steps:
            return step / o.warmup_steps
        s = (step - o.warmup_steps) / (o.decay_steps - o.warmup_steps)
        return o.end_lr_factor + 0.5 * (1 - o.end_lr_factor) * (np.cos(np.pi * s) + 1)

    def group(name):
        return "values" if "values" in name else "main"

    def lr(name, step):
        if group(name) == "main":
            return o.learning_rate * lr_factor(step)
        return g.learning_rate * (lr_factor(step) if g.follow_schedule else 1.0)

    def decay(name):
        if group(name) == "main":
            return o.weight_decay if name.endswith("kernel") else 0.0
        return o.weight_decay if g.decay_like_main else g.weight_decay

    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v2 = {n: np.zeros_like(v) for n, v in p.items()}
    for step, grads in enumerate(grads_per_step):
        sets = ([[n for n in p if group(n) == "values"], [n for n in p if group(n) == "main"]]
                if g.separate_clip else [list(p)])
        gr = {}
        for names in sets:                     # clip_grad_norm_ per set of parameters
            norm = np.sqrt(sum(np.sum(grads[n] ** 2) for n in names))
            for n in names:
                gr[n] = grads[n] * min(1.0, o.grad_clip_norm / norm)
        for n in p:
            m[n] = o.b1 * m[n] + (1 - o.b1) * gr[n]
            v2[n] = o.b2 * v2[n] + (1 - o.b2) * gr[n] ** 2
            mh, vh = m[n] / (1 - o.b1 ** (step + 1)), v2[n] / (1 - o.b2 ** (step + 1))
            p[n] = p[n] - lr(n, step) * (mh / (np.sqrt(vh) + o.eps) + decay(n) * p[n])
    return p


@pytest.mark.parametrize("earlier", [False, True], ids=["reference", "earlier_setting"])
def test_group_rate_schedule_decay_and_clipping_against_float64(x64, rng, earlier):
    """Five AdamW steps through warmup and cosine on a tiny tree, against the float64 oracle:
    the value group's rate follows the main schedule scaled to its own peak, it decays with
    the main weight decay, and each group is clipped by its own norm (gradients large enough
    that both clips act, with different factors); `earlier`: constant rate, own decay, one
    joint clip."""
    o = get_config().optim
    o.update(learning_rate=0.02, warmup_steps=2, decay_steps=6, end_lr_factor=0.1,
             weight_decay=0.3, grad_clip_norm=1.0)
    o.memory_values.update(learning_rate=0.005)
    if earlier:
        o.memory_values.update(follow_schedule=False, decay_like_main=False, weight_decay=0.05,
                               separate_clip=False)
    names = {"memory_values": (3, 2), "layer_0/mlp/values": (2, 2),
             "layer_0/mixer/q_proj/kernel": (2, 3), "layer_0/mixer_norm/scale": (3,)}
    params = {n: rng.standard_normal(s) for n, s in names.items()}
    steps = [{n: rng.standard_normal(s) * (5.0 if "values" in n else 0.7)
              for n, s in names.items()} for _ in range(5)]
    want = _adamw_oracle(o, params, steps)

    def tree(flat):      # the names as a nested param tree
        out = {}
        for n, x in flat.items():
            *path, leaf = n.split("/")
            d = out
            for k in path:
                d = d.setdefault(k, {})
            d[leaf] = jnp.asarray(x)
        return out

    tx = make_optimizer(o)
    update = jax.jit(tx.update)
    p, state = tree(params), tx.init(tree(params))
    for grads in steps:
        u, state = update(tree(grads), state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    for n in names:
        got = p
        for k in n.split("/"):
            got = got[k]
        # optax evaluates the schedule in float32 (int32 step count): ~1e-8 of each rate.
        np.testing.assert_allclose(got, want[n], rtol=1e-7, atol=1e-9, err_msg=n)


@pytest.mark.parametrize("field, value, msg", [
    ("patterns", "values,(", "config.optim.memory_values.patterns: '\\(' is not a regex"),
    ("learning_rate", 0.0, "config.optim.memory_values.learning_rate: must be > 0"),
    ("weight_decay", -1.0, "config.optim.memory_values.weight_decay: must be >= 0"),
])
def test_bad_group_settings_name_the_field(field, value, msg):
    c = get_config()
    c.optim.memory_values[field] = value
    with pytest.raises(ConfigError, match=msg):
        resolve(c)
