"""Initialisations taken from the reference models users compare with: short-conv kernels
N(0, init_std²) as fla's models re-initialise every Conv1d (`FLAPreTrainedModel._init_weights`;
PyTorch's own default would be uniform ±1/√W, 14× wider at W = 4), and attention sinks
N(0, init_std²) as gpt-oss (transformers' `GptOssPreTrainedModel._init_weights`); KDA's gate
parameters as fla's `KDAPreTrainedModel._init_weights` (A_log = log U(1, 16), or 0 with fla's
bounded "safe" gate; dt_bias the Mamba2 dt init for every key channel). The layers pass the
model's init_std through, so the test uses one that is not the default."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.attention import Attention
from layers.gated_deltanet import GatedDeltaNet
from layers.kda import KimiDeltaAttention
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


def test_kda_gate_parameters_start_as_flas():
    kw = dict(d_model=16, num_heads=64, head_dim=16, init_std=STD)
    p = _init(KimiDeltaAttention(**kw), 16)["params"]
    A = np.exp(np.asarray(p["A_log"]))
    assert A.shape == (64,) and A.min() >= 1 and A.max() <= 16 and A.std() > 2   # U(1, 16)
    dt = np.log1p(np.exp(np.asarray(p["dt_bias"])))      # softplus(dt_bias) = dt
    assert dt.shape == (64, 16) and dt.min() >= 1e-4 and dt.max() <= 0.1
    assert abs(np.median(np.log(dt)) - np.log(1e-2)) < 0.2    # log-uniform in [1e-3, 0.1]
    p = _init(KimiDeltaAttention(lower_bound=-5.0, **kw), 16)["params"]
    assert np.all(np.asarray(p["A_log"]) == 0)
