"""ssd against a float64 NumPy oracle written from Mamba2's reference code (state-spaces/mamba
`mamba_ssm/modules/mamba2.py` with `selective_state_update`'s per-token rule and
`layernorm_gated.py`'s RMSNormGated, norm_before_gate=False): a whole layer's output on random
weights, groups of heads sharing B and C, and grouped output norm included. The parity with
transformers' own Mamba2 code is tests/mem_lm/test_convert_hf.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.ssd import SSD

B, T, D_MODEL, H, P, G, N, W = 2, 11, 16, 4, 4, 2, 8, 4


def random_params(layer, x, rng):
    """Every parameter at random values of unit-scale outputs (conv biases, D and norm scales
    away from their 0 / 1 inits, so each term of the layer shows)."""
    shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), x,
                                     positions=jnp.zeros(x.shape[:2], jnp.int32)))["params"]

    def draw(path, s):
        name = path[-1].key
        if name in ("scale", "D"):
            a = 1 + 0.3 * rng.standard_normal(s.shape)
        elif name in ("dt_bias", "A_log", "bias"):
            a = 0.5 * rng.standard_normal(s.shape)
        else:
            fan_in = np.prod(s.shape[:2]) if path[-2].key == "o_proj" else s.shape[0]
            a = rng.standard_normal(s.shape) / np.sqrt(fan_in)
        return a.astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def silu(a):
    return a / (1 + np.exp(-a))


def mamba2_oracle(p, x):
    """Mamba2's layer token by token in float64, in the reference's own layout: channels
    flattened (x: H·P, B and C: G·N), state [H, P, N], head h reading group h // (H/G)."""
    flat = lambda a: a.reshape(a.shape[0], -1)
    z, xs, Bm, Cm = (x @ flat(p[f"{n}_proj"]["kernel"]) for n in ("z", "x", "B", "C"))
    dt = np.log1p(np.exp(x @ p["dt_proj"]["kernel"] + p["dt_bias"]))     # softplus
    A = -np.exp(p["A_log"])

    def conv(u, name):   # causal depthwise conv1d (zero history) + bias, then SiLU
        w = p[f"{name}_conv"]["kernel"].reshape(W, -1)
        up = np.pad(u, ((0, 0), (W - 1, 0), (0, 0)))
        y = sum(w[i] * up[:, i:i + u.shape[1]] for i in range(W))
        return silu(y + p[f"{name}_conv"]["bias"].reshape(-1))

    xs, Bm, Cm = conv(xs, "x"), conv(Bm, "B"), conv(Cm, "C")
    xh = xs.reshape(B, T, H, P)
    Bg, Cg = Bm.reshape(B, T, G, N), Cm.reshape(B, T, G, N)
    group = np.arange(H) // (H // G)
    S = np.zeros((B, H, P, N))
    y = np.zeros((B, T, H, P))
    for t in range(T):
        dA = np.exp(dt[:, t] * A)                                        # [B, H]
        dBx = dt[:, t, :, None, None] * xh[:, t, :, :, None] * Bg[:, t, group, None, :]
        S = dA[:, :, None, None] * S + dBx
        y[:, t] = np.einsum("bhpn,bhn->bhp", S, Cg[:, t, group]) + p["D"][:, None] * xh[:, t]
    # RMSNormGated(norm_before_gate=False, group_size = H·P / G): gate first, then normalise
    # each group of channels.
    g = (y.reshape(B, T, H * P) * silu(z)).reshape(B, T, G, -1)
    g = g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + 1e-5)
    g = g.reshape(B, T, H * P) * p["o_norm"]["scale"].reshape(-1)
    return g @ p["o_proj"]["kernel"].reshape(H * P, -1)


def test_layer_matches_the_mamba2_oracle(rng):
    # float32 as the layer computes (its norms and gates are float32 by design); the oracle
    # float64.
    layer = SSD(d_model=D_MODEL, num_heads=H, head_dim=P, d_state=N, ngroups=G, conv_size=W,
                norm_eps=1e-5, chunk_size=4)
    x = rng.standard_normal((B, T, D_MODEL)).astype(np.float32)
    params = random_params(layer, jnp.asarray(x), rng)
    y, _ = jax.jit(layer.apply)({"params": params}, jnp.asarray(x),
                                positions=jnp.broadcast_to(jnp.arange(T), (B, T)))
    expected = mamba2_oracle(jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                             x.astype(np.float64))
    assert np.abs(expected).mean() > 0.1          # the output is not trivially small
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
