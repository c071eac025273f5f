"""Optimizer groups by name: the memory layers' value tables get their own fixed learning rate
and weight decay (optim.memory_values), every other parameter the main AdamW."""
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


def test_values_step_at_their_own_rate_and_decay():
    """Step 0 of the warmup: the main learning rate is 0, so only the values move; by AdamW's
    first step, lr · (sign(g) + weight_decay · value)."""
    o = get_config().optim
    o.memory_values.update(learning_rate=0.01, weight_decay=0.5)
    o.decay_steps = 100
    params = {"memory_values": jnp.full((4, 2), 2.0), "layer_0": {"mlp": {
        "values": jnp.full((3, 2), -1.0), "w_query": {"kernel": jnp.ones((2, 2))}}}}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
    tx = make_optimizer(o)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["memory_values"], -0.01 * (1 + 0.5 * 2.0), rtol=1e-5)
    np.testing.assert_allclose(updates["layer_0"]["mlp"]["values"], -0.01 * (1 - 0.5),
                               rtol=1e-5)
    assert not np.asarray(updates["layer_0"]["mlp"]["w_query"]["kernel"]).any()


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
