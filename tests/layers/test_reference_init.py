"""Initialisations taken from the reference models users compare with: short-conv kernels
N(0, init_std²) as fla's models re-initialise every Conv1d (`FLAPreTrainedModel._init_weights`;
PyTorch's own default would be uniform ±1/√W, 14× wider at W = 4), and attention sinks
N(0, init_std²) as gpt-oss (transformers' `GptOssPreTrainedModel._init_weights`). The layers
pass the model's init_std through, so the test uses one that is not the default."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.attention import Attention
from layers.gated_deltanet import GatedDeltaNet
from layers.linear_attention import LinearAttention

STD = 0.1


def _init(layer, d_model):
    x = jnp.zeros((1, 4, d_model), jnp.float32)
    return nn.unbox(layer.init(jax.random.PRNGKey(0), x, positions=jnp.zeros((1, 4), jnp.int32)))


def test_short_convs_and_sinks_start_normal_with_init_std():
    kw = dict(d_model=16, num_heads=16, head_dim=16, init_std=STD)
    for layer in (LinearAttention(kind="gla", use_short_conv=True, **kw),
                  GatedDeltaNet(**kw),
                  Attention(num_kv_heads=16, use_short_conv=True, **kw)):
        p = _init(layer, 16)["params"]
        for n in ("q_conv", "k_conv", "v_conv"):
            w = np.asarray(p[n]["kernel"])            # [W, H, D]: 1,024 draws each
            name = f"{type(layer).__name__} {n}"
            assert abs(w.mean()) < 4 * STD / np.sqrt(w.size), name
            np.testing.assert_allclose(w.std(), STD, rtol=0.1, err_msg=name)
            assert np.abs(w).max() < 5 * STD, name    # not uniform ±1/√W = ±0.5
    sinks = np.asarray(_init(Attention(d_model=16, num_heads=256, num_kv_heads=256, head_dim=2,
                                       use_sinks=True, init_std=STD), 16)["params"]["sinks"])
    np.testing.assert_allclose(sinks.std(), STD, rtol=0.25)
    assert abs(sinks.mean()) < 4 * STD / np.sqrt(sinks.size)
