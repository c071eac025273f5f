"""retnet and lightning against float64 NumPy oracles written from their reference code: the
decay schedules (golden values, a head count that is not a power of two included) and a whole
layer's output on random weights (projections, RoPE, decays, the recurrence, norms, gates,
o_proj).

References: retnet — fla's `fla/layers/multiscale_retention.py` (MultiScaleRetention,
expand_v = 2, FusedRMSNormGated per head with a SiLU gate) and its `chunk_retention` decays
log(1 − 2^(−5−h)), the same as torchscale's `MultiScaleRetention` (value_factor 2).
lightning — TransNormerLLM's `modeling_transnormer.py` (OpenNLPLab, Hugging Face):
NormLinearAttention (SiLU q, k; plain v; lightning attention with no q scale; SimpleRMSNorm
over the whole width, parameter-free; times the linear gate u; out_proj), and
`TransnormerModel._build_slope_tensor` with the per-layer factor 1 − l/(L−1) + 1e-5.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.linear_attention import (LinearAttention, alibi_slopes, lightning_log_decays,
                                     retnet_log_decays)

B, T, D_MODEL = 2, 9, 16


# ------------------------------------------------------------------------- decay schedules
def reference_slopes(n):
    """TransNormerLLM's get_slopes, as its recursion reads: the power-of-two rule for the
    largest power of two p <= n, then every other slope of 2p for the rest."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_2(p) + reference_slopes(2 * p)[0::2][:n - p]


def test_decay_schedules_match_the_references():
    # Golden values of the reference formula for H = 6 and 12 (not powers of two): the slopes
    # of 4 (resp. 8) heads, then the odd slopes of 8 (resp. 16).
    np.testing.assert_array_equal(alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]))
    np.testing.assert_array_equal(
        alibi_slopes(12), 2.0 ** -np.array([1, 2, 3, 4, 5, 6, 7, 8, .5, 1.5, 2.5, 3.5]))
    for h in range(1, 33):
        np.testing.assert_allclose(alibi_slopes(h), reference_slopes(h), rtol=1e-12)
    # The per-layer factor: the first layer 1 + 1e-5, the last 1e-5.
    for layer, factor in ((0, 1 + 1e-5), (2, 1e-5), (1, 0.5 + 1e-5)):
        np.testing.assert_allclose(lightning_log_decays(6, layer, 3),
                                   -np.array(reference_slopes(6)) * factor, rtol=1e-6)
    np.testing.assert_allclose(retnet_log_decays(6),
                               np.log(1 - 2.0 ** (-5 - np.arange(6))), rtol=1e-6)


# -------------------------------------------------------------------------- layer oracles
def random_params(layer, x, rng):
    """The layer's parameters at random values of unit-scale outputs (init's N(0, 0.02) would
    leave the outputs under the norm's eps), norm scales around 1."""
    shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), x,
                                     positions=jnp.zeros(x.shape[:2], jnp.int32)))["params"]

    def draw(path, s):
        if path[-1].key == "scale":
            return 1 + 0.3 * rng.standard_normal(s.shape)
        fan_in = np.prod(s.shape[:2]) if path[-2].key == "o_proj" else s.shape[0]
        return rng.standard_normal(s.shape) / np.sqrt(fan_in)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def recurrence(q, k, v, log_decay, scale):
    """o_t = S_tᵀ (scale · q_t), S_t = exp(log_decay) S_{t−1} + k_t v_tᵀ, per head; float64."""
    S = np.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:])
    out = np.zeros(v.shape)
    for t in range(q.shape[1]):
        S = np.exp(log_decay)[None, :, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhk,bhkv->bhv", scale * q[:, t], S)
    return out


def rope(x, theta=10000.0):
    """fla's RotaryEmbedding (rotate-half, inv_freq θ^(−2i/D)) at positions 0..T−1."""
    half = x.shape[-1] // 2
    ang = np.arange(x.shape[1])[:, None] * theta ** (-np.arange(half) / half)
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def silu(x):
    return x / (1 + np.exp(-x))


def rms(x, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def run_layer(layer, rng, layer_idx=0):
    x = rng.standard_normal((B, T, D_MODEL))
    params = random_params(layer, jnp.asarray(x, jnp.float32), rng)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    y, _ = jax.jit(lambda p, x: layer.apply({"params": p}, x, positions=pos,
                                            layer_idx=layer_idx))(params, x.astype(np.float32))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    proj = lambda name: np.einsum("btd,dhk->bthk", x, p[name]["kernel"])
    return x, p, proj, np.asarray(y)


def test_retnet_layer_matches_the_float64_oracle(rng):
    """fla's MultiScaleRetention: v, the gate and the output expand_v = 2 times as wide as k."""
    H, K = 2, 4
    layer = LinearAttention(kind="retnet", d_model=D_MODEL, num_heads=H, head_dim=K,
                            expand_v=2.0, impl="xla", chunk_size=4)
    x, p, proj, y = run_layer(layer, rng)
    q, k, v, g = rope(proj("q_proj")), rope(proj("k_proj")), proj("v_proj"), proj("g_proj")
    assert v.shape[-1] == g.shape[-1] == 2 * K
    o = recurrence(q, k, v, np.log(1 - 2.0 ** (-5 - np.arange(H))), K ** -0.5)
    o = rms(o, layer.norm_eps) * p["o_norm"]["scale"] * silu(g)        # per head, gated
    want = np.einsum("bthv,hvd->btd", o, p["o_proj"]["kernel"])
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


def test_lightning_layer_matches_the_float64_oracle(rng):
    """TransNormerLLM's NormLinearAttention, in the middle layer of three, with H = 3 heads
    (interpolated slopes)."""
    H, K, L, layer_idx = 3, 4, 3, 1
    layer = LinearAttention(kind="lightning", d_model=D_MODEL, num_heads=H, head_dim=K,
                            num_layers=L, impl="xla", chunk_size=4)
    x, p, proj, y = run_layer(layer, rng, layer_idx)
    assert "o_norm" not in p                     # SimpleRMSNorm has no weight
    q, k, v, u = silu(proj("q_proj")), silu(proj("k_proj")), proj("v_proj"), proj("g_proj")
    slopes = np.array(reference_slopes(H)) * (1 - layer_idx / (L - 1) + 1e-5)
    o = recurrence(q, k, v, -slopes, 1.0).reshape(B, T, H * K)
    o = rms(o, layer.norm_eps) * u.reshape(B, T, H * K)                 # whole width, linear
    want = np.einsum("btv,vd->btd", o, p["o_proj"]["kernel"].reshape(H * K, D_MODEL))
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
