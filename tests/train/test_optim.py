import jax.numpy as jnp
import numpy as np

from configs.base import get_config
from train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


def test_no_weight_decay_on_norms_biases_gates_and_vectors():
    params = {"embed": {"embedding": jnp.ones((8, 4))},
              "layer_0": {"mixer": {"q_proj": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((4,))},
                                    "A_log": jnp.ones((2,)), "a_proj": {"kernel": jnp.ones((4, 2))},
                                    "gk_proj_b": {"kernel": jnp.ones((4, 2, 2))}},
                          "mlp": {"w_gate": {"kernel": jnp.ones((4, 8))}},
                          "mixer_norm": {"scale": jnp.ones((4,))}}}
    mask = weight_decay_mask(params, get_config().optim.no_decay_patterns)
    assert mask["embed"]["embedding"] and mask["layer_0"]["mixer"]["q_proj"]["kernel"]
    assert not mask["layer_0"]["mixer"]["q_proj"]["bias"]
    assert not mask["layer_0"]["mixer"]["A_log"] and not mask["layer_0"]["mixer_norm"]["scale"]
    assert not mask["layer_0"]["mixer"]["a_proj"]["kernel"] and not mask["layer_0"]["mixer"]["gk_proj_b"]["kernel"]
    assert mask["layer_0"]["mlp"]["w_gate"]["kernel"]   # SwiGLU's gate is an ordinary matrix


def test_schedule_warmup_then_cosine_to_end_factor():
    o = get_config().optim
    o.update(learning_rate=1.0, warmup_steps=10, decay_steps=110, end_lr_factor=0.1)
    s = learning_rate_schedule(o)
    assert float(s(0)) == 0.0 and np.isclose(float(s(5)), 0.5) and np.isclose(float(s(10)), 1.0)
    assert np.isclose(float(s(110)), 0.1) and np.isclose(float(s(60)), 0.55, atol=1e-3)


def test_clipping_and_decay_applied():
    o = get_config().optim
    o.update(learning_rate=0.1, warmup_steps=0, decay_steps=10, grad_clip_norm=1.0, weight_decay=0.5)
    tx = make_optimizer(o)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    state = tx.init(params)
    grads = {"w": jnp.zeros((2, 2)), "norm": {"scale": jnp.zeros((2,))}}
    upd, _ = tx.update(grads, state, params)
    assert float(jnp.abs(upd["w"]).max()) > 0          # decay moves w with zero gradient
    assert float(jnp.abs(upd["norm"]["scale"]).max()) == 0.0
