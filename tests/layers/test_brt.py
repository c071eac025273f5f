"""The `brt` token mixer (layers/brt.py) on its own: the layer against a float64 NumPy oracle
written window by window from the reference's rule (google-research/meliad,
transformer/memory/transformer_layer.py: tokens attend to the W tokens before them and
cross-attend to the state; after each full window the state self-attends, cross-attends to the
previous and current window, and is gated), for both gates; the gates' initialisation as the
reference's; prefills of any length and decoding == the forward; packed documents == each
document alone; causality inside and across windows, and a token reaching outputs beyond the
window only through the state."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.brt import BlockRecurrent
from mem_lm import ModelConfig

B, T, D_MODEL, H, HD, S, W = 2, 11, 16, 2, 8, 4, 3


def make(gate="fixed", **kw):
    return BlockRecurrent(d_model=D_MODEL, num_heads=H, head_dim=HD, state_size=S, window=W,
                          gate=gate, **kw)


def random_params(layer, rng):
    """Fresh random weights of a useful size: every parameter N(0, 0.5²), the attention
    scales 1 + 3|N(0, 1)| (sharp attention), so that a wrong key or gate shows."""
    shapes = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0),
                                          jnp.zeros((1, 2, D_MODEL))))

    def draw(path, s):
        if "scale" in jax.tree_util.keystr(path):
            return jnp.asarray(1 + 3 * np.abs(rng.standard_normal(s.shape)), s.dtype)
        return jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ----------------------------------------------------------------------------- the oracle
def _l2(a):
    return a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)


def _rope(a, pos, theta=10000.0):       # rotate-half, as layers/rope.py
    half = a.shape[-1] // 2
    ang = pos[:, None, None] * theta ** (-np.arange(half) / half)
    a1, a2 = a[..., :half], a[..., half:]
    return np.concatenate([a1 * np.cos(ang) - a2 * np.sin(ang),
                           a2 * np.cos(ang) + a1 * np.sin(ang)], -1)


def _attend(q, K, V, scale):
    """One query vector over the rows of K, V; nothing to attend to gives 0."""
    if len(K) == 0:
        return np.zeros(V.shape[-1])
    s = scale * (K @ q)
    p = np.exp(s - s.max())
    return (p / p.sum()) @ V


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def oracle(params, x, window, gate, eps=1e-6):
    """One document x [T, d] in float64: (outputs [T, d], the state after its last full
    window). Window n's tokens read state_n; state_{n+1} is computed after window n, from
    state_n and the tokens of windows n - 1 and n; a partial last window does not update."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x, np.float64)
    n_tok = len(x)
    proj = lambda name: np.einsum("td,dhk->thk", x, p[f"{name}_proj"]["kernel"])
    q, k, v, q2 = _l2(proj("q")), _l2(proj("k")), proj("v"), _l2(proj("q2"))
    qr, kr = _rope(q, np.arange(n_tok)), _rope(k, np.arange(n_tok))
    a, a2 = np.abs(p["attn_scale"]), np.abs(p["cross_scale"])
    b, b2 = np.abs(p["state_attn_scale"]), np.abs(p["state_cross_scale"])
    state = p["initial_state"].copy()
    y = np.zeros((n_tok, x.shape[1]))
    for n in range(-(-n_tok // window)):
        h = state / np.sqrt((state ** 2).mean(-1, keepdims=True) + eps) * p["state_norm"]
        h = h + p["state_pos"]
        sp = lambda name: np.einsum("sd,dhk->shk", h, p[f"state_{name}"])
        rq, rk, rv, rq2 = _l2(sp("q")), _l2(sp("k")), sp("v"), _l2(sp("q2"))
        for t in range(n * window, min((n + 1) * window, n_tok)):
            before = slice(max(0, t - window), t)          # the W tokens before t
            o = np.zeros((2 * H, HD))
            for i in range(H):
                o[i] = _attend(qr[t, i], kr[before, i], v[before, i], a[i])
                o[H + i] = _attend(q2[t, i], rk[:, i], rv[:, i], a2[i])
            y[t] = np.einsum("hk,hkd->d", o, p["o_proj"]["kernel"])
        if (n + 1) * window <= n_tok:                     # a full window: update the state
            read = slice(max(0, (n - 1) * window), (n + 1) * window)
            r = np.zeros((len(state), 2 * H, HD))
            for j in range(len(state)):
                for i in range(H):
                    r[j, i] = _attend(rq[j, i], rk[:, i], rv[:, i], b[i])
                    r[j, H + i] = _attend(rq2[j, i], k[read, i], v[read, i], b2[i])
            u = np.einsum("shk,hkd->sd", r, p["state_out"])
            if gate == "fixed":
                g = _sigmoid(p["gate_bias"])
                state = state * g + u * (1 - g)
            else:
                f = _sigmoid(np.einsum("shk,hkd->sd", r, p["forget_gate"]) + p["forget_bias"] + 1)
                i_ = _sigmoid(np.einsum("shk,hkd->sd", r, p["input_gate"]) + p["input_bias"] - 1)
                state = state * f + u * i_
    return y, state


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_layer_and_final_state_match_the_float64_oracle(gate, rng):
    """Outputs of T = 11 tokens with W = 3 (three updates, a partial last window) on fresh
    random weights; through the cache in one prefill, the final state is the one after the
    last full window, and the cache keeps the last 2W tokens."""
    layer = make(gate)
    params = random_params(layer, rng)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)), jnp.float32)
    y, _ = jax.jit(lambda p, x: layer.apply(p, x))(params, x)
    yc, cache = jax.jit(lambda p, x: layer.apply(p, x, cache=layer.init_cache(B, T + 2),
                                                 cache_pos=jnp.int32(0)))(params, x)
    for b in range(B):
        want, state = oracle(params, x[b], W, gate)
        scale = np.abs(want).max()
        np.testing.assert_allclose(y[b], want, atol=2e-5 * scale, rtol=0)
        np.testing.assert_allclose(yc[b], want, atol=2e-5 * scale, rtol=0)
        np.testing.assert_allclose(cache["state"][b], state, atol=2e-5 * np.abs(state).max())
    assert cache["slot_pos"].tolist() == list(range(T - 2 * W, T))
    k = x @ params["params"]["k_proj"]["kernel"].reshape(D_MODEL, -1)
    k = np.asarray(k).reshape(B, T, H, HD)
    np.testing.assert_allclose(cache["k"], _l2(k[:, -2 * W:]), atol=1e-5)


def test_gate_and_state_initialisation_follow_the_reference():
    """The reference's inits: gate biases N(0, 0.1²) (the LSTM gate's +1 forget / -1 input
    offsets are in the forward, checked by the oracle), gate kernels variance_scaling(0.1,
    fan_in), initial state N(0, 0.1²), state position embeddings N(0, 1), attention scales 1."""
    d, n_state = 512, 64
    for gate in ("fixed", "lstm"):
        layer = BlockRecurrent(d_model=d, num_heads=2, head_dim=8, state_size=n_state, window=2,
                               gate=gate)
        p = nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 1, d))))["params"]
        std = lambda name: float(np.std(p[name]))
        assert 0.09 < std("initial_state") < 0.11 and 0.95 < std("state_pos") < 1.05
        for n in ("attn_scale", "cross_scale", "state_attn_scale", "state_cross_scale"):
            assert (np.asarray(p[n]) == 1).all()
        if gate == "fixed":
            assert 0.09 < std("gate_bias") < 0.11 and abs(float(np.mean(p["gate_bias"]))) < 0.02
            assert "forget_gate" not in p
        else:
            fan_in = 2 * 2 * 8
            for n in ("forget", "input"):
                assert 0.09 < std(f"{n}_bias") < 0.11
                assert abs(std(f"{n}_gate") / np.sqrt(0.1 / fan_in) - 1) < 0.05
            assert "gate_bias" not in p


def test_prefills_and_decoding_equal_the_forward(rng):
    """Through the cache: 5 tokens (a partial window), 1 (a window end), 2 from the middle of
    a window, then single tokens: the forward's outputs."""
    layer = make("lstm")
    params = random_params(layer, rng)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)), jnp.float32)
    full, _ = jax.jit(lambda p, x: layer.apply(p, x))(params, x)
    step = jax.jit(lambda p, x, c, pos: layer.apply(p, x, cache=c, cache_pos=pos))
    cache, outs, pos = layer.init_cache(B, T), [], 0
    for n in (5, 1, 2, 1, 1, 1):
        y, cache = step(params, x[:, pos:pos + n], cache, jnp.int32(pos))
        outs.append(y)
        pos += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5 * np.abs(full).max(),
                               rtol=0)


def test_packed_documents_equal_each_document_alone(rng):
    """Documents starting mid-window (W = 3): row 0 has documents of 4, 5 and 2 tokens, row 1
    of 1, 7 and 3; each restarts from the learned initial state with its own windows, and the
    state update of a window holding two documents reads its own document only."""
    layer = make("fixed")
    params = random_params(layer, rng)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)), jnp.float32)
    lengths = [(4, 5, 2), (1, 7, 3)]
    seg = jnp.asarray([np.repeat(np.arange(len(r)), r) for r in lengths], jnp.int32)
    docs = [(b, s, s + n) for b, r in enumerate(lengths)
            for s, n in zip(np.cumsum((0,) + r[:-1]), r)]
    alone = jnp.stack([jnp.pad(x[b, s:e], ((0, T - e + s), (0, 0))) for b, s, e in docs])
    fwd = jax.jit(lambda p, x, s: layer.apply(p, x, segment_ids=s)[0])
    packed = fwd(params, x, seg)
    ya = fwd(params, alone, jnp.ones(alone.shape[:2], jnp.int32))
    scale = float(np.abs(ya).max())
    for i, (b, s, e) in enumerate(docs):
        np.testing.assert_allclose(packed[b, s:e], ya[i, :e - s], atol=2e-5 * scale, rtol=0,
                                   err_msg=f"document {i}")
    # ... and each document alone is the oracle's.
    want, _ = oracle(params, x[1, 1:8], W, "fixed")
    np.testing.assert_allclose(packed[1, 1:8], want, atol=2e-5 * np.abs(want).max(), rtol=0)


def test_causality_and_the_state_carries_tokens_beyond_the_window(rng):
    """Changing the tokens after t leaves the outputs at <= t unchanged, for cuts inside a
    window (1, 4), at a window's last token (2, 5, 8) and right after one (6); and a change of
    token 0 alone reaches token 10, which it can reach only through the state (its self-
    attention sees tokens 7..9)."""
    layer = make("fixed")
    params = random_params(layer, rng)
    x = rng.standard_normal((T, D_MODEL))
    cuts = (1, 2, 4, 5, 6, 8)
    rows = [x]
    for t in cuts:
        z = x.copy()
        z[t + 1:] = rng.standard_normal((T - t - 1, D_MODEL))
        rows.append(z)
    z = x.copy()
    z[0] = rng.standard_normal(D_MODEL)
    rows.append(z)
    y, _ = jax.jit(lambda p, x: layer.apply(p, x))(params, jnp.asarray(np.stack(rows),
                                                                        jnp.float32))
    y = np.asarray(y)
    scale = np.abs(y[0]).max()
    for r, t in enumerate(cuts, start=1):
        np.testing.assert_allclose(y[r, :t + 1], y[0, :t + 1], atol=1e-6 * scale, rtol=0,
                                   err_msg=f"cut {t}")
        assert np.abs(y[r, t + 1:] - y[0, t + 1:]).max() > 1e-3 * scale
    assert np.abs(y[-1, 10] - y[0, 10]).max() > 1e-3 * scale


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_gradients_reach_the_state_and_its_gate(gate, rng):
    """Through the window scan (checkpointed blocks): the learned initial state, the state
    position embeddings, the state projections and the gate get nonzero, finite gradients,
    equal to central differences along a random direction."""
    layer = make(gate)
    params = random_params(layer, rng)
    x = jnp.asarray(rng.standard_normal((1, 8, D_MODEL)), jnp.float32)
    loss = jax.jit(lambda p: jnp.sum(jnp.sin(layer.apply(p, x)[0])))
    g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x)[0]))))(params)["params"]
    names = ["initial_state", "state_pos", "state_q2", "state_out"] + (
        ["gate_bias"] if gate == "fixed" else ["forget_gate", "input_bias"])
    for n in names:
        assert np.isfinite(g[n]).all() and float(jnp.abs(g[n]).max()) > 1e-6, n
    direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                             params)
    eps = 1e-2
    shift = lambda c: jax.tree.map(lambda a, d: a + c * eps * d, params, direction)
    numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
    analytic = sum(jnp.vdot(a, d) for a, d in zip(
        jax.tree.leaves(g), jax.tree.leaves(direction["params"])))
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


@pytest.mark.parametrize("field, value", [("state_size", 0), ("window", 0), ("window", -2),
                                          ("gate", "gru"), ("gate", "bias")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ModelConfig.mixers.brt.{field}: "):
        ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, pattern=("brt",),
                    mixers={"brt": {field: value}})
    with pytest.raises(ValueError, match="ModelConfig.head_dim: must be even"):
        ModelConfig(vocab_size=11, d_model=18, num_layers=1, num_heads=2, pattern=("brt",))
