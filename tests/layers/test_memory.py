"""pkm and memory_plus against a float64 brute-force reference (every one of the N slots
scored, the exact top-k taken), in outputs and gradients; the shared value pool is one table
with and without scan_layers; the metrics; the setting checks."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.memory import SHARED_VALUES, MemoryLayer
from mem_lm import LanguageModel, ModelConfig, apply_with_aux, param_count

D, N_KEYS, HEADS, TOPK, K_DIM = 8, 6, 2, 3, 4


def brute_force(p, x, plus, memory_values=None):
    """y of the mechanism from all n_keys² slot scores (no product-key shortcut): the top-k of
    s1[i] + s2[j] over every (i, j) is what the two-stage top-k must find."""
    q = jnp.einsum("btd,dhce->bthce", x, p["w_query"]["kernel"])
    q = q * jax.lax.rsqrt(jnp.mean(q * q, axis=-1, keepdims=True) + 1e-6)   # query_norm
    s = jnp.einsum("bthce,hcne->bthcn", q, p["keys"])
    full = (s[..., 0, :, None] + s[..., 1, None, :]).reshape(s.shape[:3] + (N_KEYS ** 2,))
    top, slot = jax.lax.top_k(full, TOPK)
    w = jax.nn.softmax(top, axis=-1)
    values = p["values"] if memory_values is None else memory_values
    y = jnp.einsum("bthk,bthkd->btd", w, values[slot])
    if not plus:
        return y, slot, w
    h = y * jax.nn.silu(x @ p["w_gate"]["kernel"])
    return h @ p["w_out"]["kernel"], slot, w


def layer(plus, impl="xla"):
    return MemoryLayer(d_model=D, n_keys=N_KEYS, heads=HEADS, topk=TOPK, k_dim=K_DIM,
                       plus=plus, shared_values=False, impl=impl, init_std=0.5,
                       dtype=jnp.float64)


@pytest.mark.parametrize("plus, impl", [(False, "xla"), (True, "pallas")],
                         ids=["pkm-xla", "memory_plus-pallas"])
def test_layer_matches_brute_force_float64(plus, impl, x64, rng):
    m = layer(plus, impl)
    x = jnp.asarray(rng.standard_normal((2, 5, D)))
    shapes = nn.meta.unbox(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"])
    p = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), shapes)
    assert p["values"].shape == (N_KEYS ** 2, D) and p["keys"].shape == (HEADS, 2, N_KEYS, 2)
    ct = jnp.asarray(rng.standard_normal((2, 5, D)))

    def layer_loss(p, x):
        y, aux = m.apply({"params": p}, x, mutable=["aux_metrics"])
        return jnp.sum(y * ct), (y, aux["aux_metrics"])

    def ref_loss(p, x):
        y, slot, w = brute_force(p, x, plus)
        return jnp.sum(y * ct), (y, slot, w)

    (_, (y, metrics)), g = jax.jit(jax.value_and_grad(layer_loss, (0, 1), has_aux=True))(p, x)
    (_, (ref, slot, w)), gr = jax.jit(jax.value_and_grad(ref_loss, (0, 1), has_aux=True))(p, x)
    assert len(np.unique(np.asarray(slot))) > 2 * TOPK    # the tokens read different slots
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(gr)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10, err_msg=str(path))
    # Metrics: the fraction of slots read by this batch, and the weights' entropy.
    (usage,), (entropy,) = metrics["memory_key_usage"], metrics["memory_weight_entropy"]
    np.testing.assert_allclose(usage, len(np.unique(np.asarray(slot))) / N_KEYS ** 2)
    np.testing.assert_allclose(entropy, -np.mean(np.sum(w * np.log(w), -1)), rtol=1e-6)


def model_cfg(**kw):
    return ModelConfig(vocab_size=32, d_model=D, num_layers=2, num_heads=2, pattern=("attn",),
                       channel_pattern=("memory_plus",), init_std=0.3,
                       mixers={"memory_plus": dict(n_keys=N_KEYS, heads=HEADS, topk=TOPK)},
                       **kw)


def test_shared_value_pool_is_one_table_with_and_without_scan(rng):
    """Layers 0 and 1 read one `memory_values` table; scan_layers keeps it one table (not
    stacked per group) and computes the plain model's loss, metrics and gradients; the
    table's gradient sums both layers' reads."""
    cfg = model_cfg()
    scfg = dataclasses.replace(cfg, scan_layers=True)
    tokens = jnp.asarray(rng.integers(0, 32, (2, 6)), jnp.int32)
    shapes = jax.eval_shape(LanguageModel(cfg).init, jax.random.PRNGKey(0), tokens)
    p = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                     nn.meta.unbox(shapes["params"]))
    assert p[SHARED_VALUES].shape == (N_KEYS ** 2, D)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)]
    assert [n for n in paths if "values" in n] == [f"['{SHARED_VALUES}']"], paths
    sp = {**{n: p[n] for n in ("embed", "final_norm", SHARED_VALUES)},
          "groups": {"block_0": jax.tree.map(lambda *a: jnp.stack(a), p["layer_0"],
                                             p["layer_1"])}}
    assert param_count(cfg) == param_count(scfg) == sum(a.size for a in jax.tree.leaves(sp))

    def grad_fn(cfg):
        def loss(p):
            logits, aux = apply_with_aux(LanguageModel(cfg), {"params": p}, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), aux["metrics"]
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    plain, scanned = grad_fn(cfg), grad_fn(scfg)
    (l1, m1), g1 = plain(p)
    (l2, m2), g2 = scanned(sp)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for k in ("memory_key_usage", "memory_weight_entropy"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6)
    np.testing.assert_allclose(g2[SHARED_VALUES], g1[SHARED_VALUES], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g2["groups"]["block_0"]["mlp"]["keys"][1],
                               g1["layer_1"]["mlp"]["keys"], rtol=1e-5, atol=1e-7)
    # Both layers write into the one table: with layer 1's read cut, its gradient changes.
    mlp1 = p["layer_1"]["mlp"]
    cut = {**p, "layer_1": {**p["layer_1"], "mlp": {
        **mlp1, "w_out": {"kernel": jnp.zeros_like(mlp1["w_out"]["kernel"])}}}}
    g_cut = plain(cut)[1][SHARED_VALUES]
    assert np.abs(g_cut).max() > 0 and not np.allclose(g_cut, g1[SHARED_VALUES])


@pytest.mark.parametrize("mixers, field", [
    (dict(n_keys=46341), "mixers.memory_plus.n_keys"),        # n_keys² > 2**31 - 1
    (dict(n_keys=4, topk=5), "mixers.memory_plus.topk"),
    (dict(k_dim=3), "mixers.memory_plus.k_dim"),
    (dict(bag_impl="fast"), "mixers.memory_plus.bag_impl"),
    (dict(heads=0), "mixers.memory_plus.heads"),
])
def test_bad_settings_name_the_field(mixers, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(vocab_size=32, d_model=D, num_layers=1, num_heads=2,
                    channel_pattern=("memory_plus",), mixers={"memory_plus": mixers})


@pytest.mark.parametrize("channel", ["pkm", "memory_plus"])
def test_param_count_formula(channel):
    """The README's formula: W_q d·H·k_dim, sub-keys H·n_keys·k_dim, values n_keys²·d (once
    per model when shared), memory_plus's W_1 and W_o 2·d², and each block's mlp_norm d."""
    d, H, n, kd = 16, 2, 5, 6
    settings = dict(n_keys=n, heads=H, topk=3, k_dim=kd)
    cfg = ModelConfig(vocab_size=32, d_model=d, num_layers=2, num_heads=2, pattern=("attn",),
                      channel_pattern=(channel,), mixers={channel: settings})
    base = ModelConfig(vocab_size=32, d_model=d, num_layers=2, num_heads=2, pattern=("attn",),
                       channel_pattern=("none",))
    per_layer = d + d * H * kd + H * n * kd + (2 * d * d if channel == "memory_plus" else 0)
    values = n * n * d * (1 if channel == "memory_plus" else 2)
    assert param_count(cfg) - param_count(base) == 2 * per_layer + values
