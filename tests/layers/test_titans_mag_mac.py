"""Titans MAG and MAC (layers/titans_mag.py, layers/titans_mac.py) against float64 NumPy loops
written from the paper's equations (Behrouz et al. 2025, Eq. 21–28, with this project's
documented causal choices: MAC's read-outs at their tokens' positions and reads at the chunk
start; the neural memory rule token by token with gradients written out), on random inputs and
random parameters; MAC's restarting token scan for packed rows and its prefills that start
inside a segment; the
settings' named errors. Decoding == forward, packed == separate and causality through the
whole model are the model-wide tests' (tests/mem_lm/test_model.py, test_causality.py)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layers.titans_mac as titans_mac
from layers.titans_mac import TitansMAC
from layers.titans_mag import TitansMAG
from mem_lm import ModelConfig

B, T, D_MODEL, H, D, E = 2, 11, 16, 2, 4, 8
SMALL = dict(d_model=D_MODEL, num_heads=H, head_dim=D, expansion=E / D, persistent_tokens=2,
             chunk_size=2)


# ------------------------------------------------------------------------- the NumPy oracle
def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def gelu_grad(x):
    return (0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
            + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def l2n(x):
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def dense(x, kernel):
    if x.ndim == 2:                    # [T, d] @ [d, ...]
        return np.tensordot(x, kernel, 1)
    return np.tensordot(x, kernel, 2)  # [T, H, D] @ [H, D, d]


def conv_silu(x, kernel):
    """Causal depthwise conv (kernel [W, H, D], x [T, H, D]) then SiLU."""
    W = kernel.shape[0]
    xp = np.concatenate([np.zeros((W - 1,) + x.shape[1:]), x])
    return silu(sum(kernel[i] * xp[i:i + len(x)] for i in range(W)))


def rope(x, positions, theta=10000.0):
    half = x.shape[-1] // 2
    ang = np.asarray(positions, np.float64)[:, None, None] * theta ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def read(P, x):
    """M_P(x) of one head: P = [M] or [W1, W2]."""
    return x @ P[0] if len(P) == 1 else gelu(x @ P[0]) @ P[1]


def grad(P, k, v):
    """∇_P ½‖M_P(k) − v‖² of one head."""
    if len(P) == 1:
        return [np.outer(k, k @ P[0] - v)]
    h = k @ P[0]
    e = gelu(h) @ P[1] - v
    return [np.outer(k, (P[1] @ e) * gelu_grad(h)), np.outer(gelu(h), e)]


def memory_inputs(p, x, conv):
    """The memory's q, k, v [T, H, D] and θ, η, α [T, H] from x [T, d] (params p)."""
    qkv = [dense(x, p[f"{n}_proj"]["kernel"]) for n in "qkv"]
    qkv = [conv_silu(t, p[f"{n}_conv"]["kernel"]) if conv else silu(t)
           for n, t in zip("qkv", qkv)]
    gate = lambda n: sigmoid(dense(x, p[f"{n}_proj"]["kernel"]) + p[f"{n}_bias"])
    return l2n(qkv[0]), l2n(qkv[1]), qkv[2], gate("lr"), gate("momentum"), gate("decay")


def memory_rule(args, P, Z, chunk):
    """The rule over tokens (one row): Z ← ηZ − θ∇ℓ(P_{t'}), P ← (1 − α)P + Z, o_t = M_{P_{t'}}(q_t),
    t' the start of t's chunk (counted from the first token). P, Z: per head lists."""
    q, k, v, lr, eta, alpha = args
    o = np.zeros(v.shape)
    for h in range(H):
        for t in range(len(q)):
            if t % chunk == 0:
                start = [a.copy() for a in P[h]]
            o[t, h] = read(start, q[t, h])
            Z[h] = [eta[t, h] * z - lr[t, h] * g for z, g in zip(Z[h], grad(start, k[t, h],
                                                                               v[t, h]))]
            P[h] = [(1 - alpha[t, h]) * a + z for a, z in zip(P[h], Z[h])]
    return o


def initial(p, depth):
    P = [[p["memory_w1"][h], p["memory_w2"][h]] if depth == 2 else [np.zeros((D, D))]
         for h in range(H)]
    return P, [[np.zeros_like(a) for a in P[h]] for h in range(H)]


def softmax_attend(q, keys, vals):
    """One query [D] over keys/values [n, D]."""
    s = keys @ q / math.sqrt(D)
    w = np.exp(s - s.max())
    return (w / w.sum()) @ vals


def gate(p, y, m):
    return rms(y, p["attn_out_norm"]["scale"]) * sigmoid(rms(m, p["memory_out_norm"]["scale"]))


def mag_oracle(p, x, window, chunk, depth):
    """MAG, Eq. 26–28: SW-Attn with persistent keys beside the `titans` layer, gated."""
    a, mem = p["attn"], p["memory"]
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        t = np.arange(T)
        q = rope(dense(x[b], a["q_proj"]["kernel"]), t)
        k = rope(dense(x[b], a["k_proj"]["kernel"]), t)
        v = dense(x[b], a["v_proj"]["kernel"])
        att = np.zeros((T, H, D))
        for i in range(T):
            lo = max(0, i - window + 1)
            for h in range(H):
                att[i, h] = softmax_attend(
                    q[i, h], np.concatenate([a["persistent_k"][:, h], k[lo:i + 1, h]]),
                    np.concatenate([a["persistent_v"][:, h], v[lo:i + 1, h]]))
        y = dense(att, a["o_proj"]["kernel"])
        P, Z = initial(mem, depth)
        o = memory_rule(memory_inputs(mem, x[b], conv=True), P, Z, chunk)
        m = dense(rms(o, mem["o_norm"]["scale"]), mem["o_proj"]["kernel"])
        out[b] = gate(p, y, m)
    return out


def mac_oracle(p, x, segment, chunk, depth):
    """MAC, Eq. 21–25, per segment: read-outs of the memory as it was when the segment began,
    attention over [persistent; read-outs ≤ i; tokens ≤ i], the memory learning from y and
    read back with y's query, gated."""
    c = p["cell"]
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        t = np.arange(T)
        r = l2n(conv_silu(dense(x[b], p["read_q_proj"]["kernel"]), p["read_conv"]["kernel"]))
        q = rope(dense(x[b], c["q_proj"]["kernel"]), t)
        k = rope(dense(x[b], c["k_proj"]["kernel"]), t)
        v = dense(x[b], c["v_proj"]["kernel"])
        P, Z = initial(p, depth)
        for s0 in range(0, T, segment):
            seg = np.arange(s0, min(s0 + segment, T))
            h = np.stack([[read(P[j], r[i, j]) for j in range(H)] for i in seg])   # [S, H, D]
            hm = dense(rms(h, c["read_norm"]["scale"]), c["read_proj"]["kernel"])
            kh = rope(dense(hm, c["k_proj"]["kernel"]), seg)
            vh = dense(hm, c["v_proj"]["kernel"])
            att = np.zeros((len(seg), H, D))
            for n, i in enumerate(seg):
                for j in range(H):
                    att[n, j] = softmax_attend(
                        q[i, j], np.concatenate([c["persistent_k"][:, j], kh[:n + 1, j],
                                                 k[s0:i + 1, j]]),
                        np.concatenate([c["persistent_v"][:, j], vh[:n + 1, j],
                                        v[s0:i + 1, j]]))
            y = dense(att, c["o_proj"]["kernel"])
            o = memory_rule(memory_inputs(c["memory"], y, conv=False), P, Z, chunk)
            m = dense(rms(o, p["o_norm"]["scale"]), p["o_proj"]["kernel"])
            out[b, seg] = gate(p, y, m)
    return out


# ------------------------------------------------------------------------------- helpers
def random_params(layer, rng, x):
    """The layer's parameter tree with random values of a useful size (norm scales near 1)."""
    shapes = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), x,
                                          positions=jnp.arange(T)[None]))

    def draw(path, s):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        z = rng.standard_normal(s.shape)
        return jnp.asarray(1 + 0.2 * z if name.endswith("scale") else 0.4 * z, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)["params"]


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_mag_matches_float64_oracle(x64, rng, depth):
    """T = 11, window 3, 2 persistent tokens, memory chunks of 2 (the last one partial)."""
    layer = TitansMAG(**SMALL, window=3, depth=depth, dtype=jnp.float64)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)))
    params = random_params(layer, rng, x)
    y, _ = jax.jit(lambda p, x: layer.apply(p, x, positions=jnp.arange(T)[None]))(params, x)
    ref = mag_oracle(as_numpy(params), np.asarray(x), 3, 2, depth)
    # RMSNorm and RoPE compute in float32 inside the layer.
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_mac_matches_float64_oracle(x64, rng, depth):
    """T = 11 in segments of 4 (the last one partial), memory chunks of 2 inside them."""
    layer = TitansMAC(**SMALL, segment_length=4, depth=depth, dtype=jnp.float64)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)))
    params = random_params(layer, rng, x)
    y, _ = jax.jit(lambda p, x: layer.apply(p, x, positions=jnp.arange(T)[None]))(params, x)
    ref = mac_oracle(as_numpy(params), np.asarray(x), 4, 2, depth)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_mac_token_scan_packing_and_prefills_equal_the_forward(rng, monkeypatch):
    """Documents of 4, 5 and 2 tokens in segments of 3 (documents that start inside a segment
    of the row), with room for one document a row: the restarting token scan gives each
    document alone (the realigned segment scan, room for all, is the model-wide packing test's
    path). Through the cache, prefills of 4, 4, 3 tokens (the second and third start inside a
    segment) give the forward (single decode tokens: the model-wide decode test)."""
    layer = TitansMAC(**SMALL, segment_length=3)
    x = jnp.asarray(rng.standard_normal((B, T, D_MODEL)), jnp.float32)
    params = random_params(layer, rng, x)
    seg = jnp.asarray([[1] * 4 + [2] * 5 + [3] * 2] * B, jnp.int32)
    starts = (0, 4, 9, T)
    pos = jnp.asarray(np.concatenate([np.arange(e - s) for s, e in zip(starts, starts[1:])]))
    # Each document alone, at the start of its own row padded after it (causal), and the
    # rows themselves: one call.
    docs = jnp.concatenate([jnp.pad(x[:, s:e], ((0, 0), (0, T - e + s), (0, 0)))
                            for s, e in zip(starts, starts[1:])] + [x])
    out = jax.jit(lambda p, x: layer.apply(p, x, positions=jnp.arange(T)[None])[0])(params, docs)
    alone, full = out[:3 * B].reshape(3, B, T, -1), out[3 * B:]
    monkeypatch.setattr(titans_mac, "docs_per_row", lambda length, chunk: 1)
    packed = jax.jit(lambda p, x, pos, seg: layer.apply(p, x, positions=pos, segment_ids=seg)[0])(
        params, x, jnp.broadcast_to(pos, (B, T)), seg)
    for i, (s, e) in enumerate(zip(starts, starts[1:])):
        np.testing.assert_allclose(packed[:, s:e], alone[i, :, :e - s], atol=2e-5, rtol=2e-5,
                                   err_msg=f"document {i}")
    cache = layer.init_cache(B, T)
    step = jax.jit(lambda p, x, c, at: layer.apply(
        p, x, positions=(at + jnp.arange(x.shape[1]))[None], cache=c, cache_pos=at))
    outs, at = [], 0
    for n in (4, 4, 3):
        y, cache = step(params, x[:, at:at + n], cache, jnp.int32(at))
        outs.append(y)
        at += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mixer, setting, value", [
    ("titans_mac", "segment_length", 0),
    ("titans_mac", "persistent_tokens", -1),
    ("titans_mac", "memory_chunk", 0),
    ("titans_mag", "window", 0),
    ("titans_mag", "persistent_tokens", 2**16 + 1),
    ("titans_mag", "depth", 3),
])
def test_bad_settings_name_the_field(mixer, setting, value):
    with pytest.raises(ValueError, match=f"ModelConfig.mixers.{mixer}.{setting}"):
        ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, pattern=(mixer,),
                    mixers={mixer: {setting: value}})
