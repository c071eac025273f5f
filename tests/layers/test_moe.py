"""The sparse MoE channel mixer (layers/moe.py): against a float64 NumPy oracle written here
(routing and experts, token by token, for both routers), against transformers' own MoE blocks
of Qwen3-Next and Kimi Linear (tests/fixtures/hf/moe_*, made by
tests/fixtures/make_hf_moe_fixtures.py with torch 2.13 + transformers 5.24), the load-balance
loss against transformers' `load_balancing_loss_func`, the dense and ragged (grouped matmul)
computations against each other, and the settings' checks. Decoding == full forward and
causality run in tests/mem_lm/test_model.py and test_causality.py; sharding in
test_moe_sharding.py.

Each test compiles one program (both dispatches inside it where it compares them); parameters are
drawn from their shapes, not by running `init`."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import moe
from layers.moe import MoE
from layers.registry import AUX_METRICS, AUX_POOLED
from mem_lm import LanguageModel, ModelConfig, apply_with_aux

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
D = 16
STD = 0.3


def param_shapes(m):
    return jax.eval_shape(lambda: nn.meta.unbox(m.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 1, m.d_model), m.dtype))["params"]))


def random_params(m, rng, dtype=jnp.float32):
    """Every matrix N(0, STD²) (the router's larger, so the routing spreads), the
    score-correction bias N(0, 0.3²) (it changes the choice)."""
    def fill(path, s):
        scale = 1.0 if "router" in jax.tree_util.keystr(path) else STD
        return jnp.asarray(scale * rng.standard_normal(s.shape), dtype)
    return jax.tree_util.tree_map_with_path(fill, param_shapes(m))


def silu(a):
    return a / (1 + np.exp(-a))


def oracle(m: MoE, p, x):
    """The layer token by token in float64 NumPy: y [B, T, d], the chosen experts (as sorted
    tuples, per token) and the balance statistics [F (E), P (E)]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64).reshape(-1, m.d_model)
    E, k, G = m.num_experts, m.top_k, m.n_group
    ys, chosen, shares, probs = [], [], np.zeros(E), []
    for xt in x:
        z = xt @ p["router"]["kernel"]
        if m.router == "softmax":
            score = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            choice, prob = score, score
        else:
            score = 1 / (1 + np.exp(-z))
            choice = score + (p["score_bias"] if m.score_correction_bias else 0)
            prob = score / score.sum()
        if G > 1:
            groups = choice.reshape(G, E // G)
            group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
            allowed = np.argsort(-group_score, kind="stable")[:m.topk_group]
            choice = np.where(np.isin(np.arange(E) // (E // G), allowed), choice, -np.inf)
        top = np.argsort(-choice, kind="stable")[:k]
        w = score[top]
        if m.norm_topk_prob:
            w = w / w.sum()
        w = w * m.routed_scaling_factor
        y = sum(wj * (silu(xt @ p["w_gate"][e]) * (xt @ p["w_up"][e])) @ p["w_out"][e]
                for wj, e in zip(w, top))
        if m.d_shared:
            s = p["shared_expert"]
            h = silu(xt @ s["w_gate"]["kernel"]) * (xt @ s["w_up"]["kernel"])
            sh = h @ s["w_out"]["kernel"]
            if m.shared_gate:
                sh = sh / (1 + np.exp(-(xt @ p["shared_expert_gate"]["kernel"])))
            y = y + sh
        ys.append(y)
        chosen.append(tuple(sorted(top)))
        shares[top] += 1
        probs.append(prob)
    stats = np.concatenate([shares / len(x), np.mean(probs, 0)])
    return np.stack(ys), chosen, stats


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def both_dispatches(m: MoE):
    """jit of (params, x, cotangent) -> per dispatch (dense, ragged): (y, the sowed aux, the
    gradients of y·ct with respect to the params and x)."""
    def run(p, x, ct):
        out = {}
        for impl in ("dense", "ragged"):
            mi = m.clone(dispatch=impl)
            y, pull, aux = jax.vjp(
                lambda p, x: mi.apply({"params": p}, x, mutable=[AUX_POOLED, AUX_METRICS]),
                p, x, has_aux=True)
            out[impl] = (y, aux, pull(ct))
        return out
    return jax.jit(run)


CASES = {
    # Qwen3-Next: softmax, renormalised top-2 of 8, a gated shared expert.
    "softmax-shared-gate": dict(num_experts=8, top_k=2, d_expert=12, d_shared=20,
                                shared_gate=True),
    # Qwen2-MoE-like: the raw top-3 probabilities, scaled, no shared expert.
    "softmax-unnormed": dict(num_experts=6, top_k=3, d_expert=8, norm_topk_prob=False,
                             routed_scaling_factor=1.7),
    # Kimi / DeepSeek-V3: sigmoid + bias, the best 2 of 4 groups, top-3, scaled, shared.
    "sigmoid-grouped": dict(num_experts=16, top_k=3, d_expert=8, router="sigmoid",
                            score_correction_bias=True, n_group=4, topk_group=2,
                            routed_scaling_factor=2.446, d_shared=16),
    # Sigmoid without groups, bias or renormalisation.
    "sigmoid-plain": dict(num_experts=8, top_k=2, d_expert=8, router="sigmoid",
                          norm_topk_prob=False),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_oracle_float64(case, x64, rng):
    """Outputs and the load-balance statistics of both dispatches equal the token-by-token oracle;
    the dispatches' gradients (every parameter, and x) equal each other and reach every
    parameter (the bias only chooses: its gradient is 0)."""
    m = MoE(D, dtype=jnp.float64, **CASES[case])
    B, T = 2, 7
    p = random_params(m, rng, jnp.float64)
    x = jnp.asarray(rng.standard_normal((B, T, D)))
    ct = jnp.asarray(rng.standard_normal((B, T, D)))
    y_ref, chosen, stats_ref = oracle(m, p, x)
    out = both_dispatches(m)(p, x, ct)
    for impl, (y, aux, _) in out.items():
        assert y.dtype == jnp.float64
        assert rel_err(y.reshape(-1, D), y_ref) < 1e-12, impl
        np.testing.assert_allclose(aux[AUX_POOLED][moe.LOSS][0], stats_ref, atol=1e-12)
    if m.n_group > 1:   # the groups restrict the choice for some tokens
        free, _, _ = oracle(m.clone(n_group=1, topk_group=1), p, x)
        assert rel_err(free, y_ref) > 1e-3
    grads = {impl: g for impl, (_, _, g) in out.items()}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads["ragged"]),
                            jax.tree.leaves(grads["dense"])):
        name = jax.tree_util.keystr(path)
        assert rel_err(a, b) < 1e-12, name
        assert (np.abs(np.asarray(b)).max() == 0) == ("score_bias" in name), name


def test_metrics(rng):
    """moe_max_load is the busiest expert's share over the balanced one; the router entropy
    is that of P per token (here: 2 of 4 experts, 4 tokens)."""
    m = MoE(D, num_experts=4, top_k=2, d_expert=8)
    logits = jnp.asarray([[[0., 5., 5., 0.], [0., 5., 0., 5.], [5., 5., 0., 0.],
                           [0., 5., 5., 0.]]])
    w, e, probs = moe.route(logits, top_k=2, router="softmax", norm_topk_prob=True)
    stats = moe.balance_stats(e, probs)
    np.testing.assert_allclose(stats[:4], [0.25, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(w, 0.5, rtol=1e-6)
    p = random_params(m, rng)
    _, aux = jax.jit(lambda p, x: m.apply({"params": p}, x, mutable=[AUX_POOLED, AUX_METRICS]))(
        p, jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32))
    F = aux[AUX_POOLED][moe.LOSS][0][:4]
    np.testing.assert_allclose(aux[AUX_METRICS]["moe_max_load"][0], F.max() * 4 / 2, rtol=1e-6)
    assert 0 < aux[AUX_METRICS]["moe_router_entropy"][0] <= np.log(4) + 1e-6


# --- transformers' blocks ---------------------------------------------------------------------

HF_KINDS = sorted(d for d in os.listdir(FIXTURES) if d.startswith("moe_"))


def from_hf(kind):
    """(module, params, fixture) for a fixture: the transformers config's MoE fields as moe's
    settings, the block's weights as moe's parameters (transformers' Linear weights are
    [out, in]; experts.gate_up_proj [E, 2F, d] is gate then up; down_proj [E, d, F])."""
    path = os.path.join(FIXTURES, kind)
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    w = dict(np.load(os.path.join(path, "moe.npz")))
    F = c["moe_intermediate_size"]
    gate_up = w["experts.gate_up_proj"].transpose(0, 2, 1)          # [E, d, 2F]
    p = {"router": {"kernel": w["gate.weight"].T},
         "w_gate": gate_up[..., :F], "w_up": gate_up[..., F:],
         "w_out": w["experts.down_proj"].transpose(0, 2, 1)}
    if c["model_type"] == "qwen3_next":
        settings = dict(num_experts=c["num_experts"], router="softmax",
                        d_shared=c["shared_expert_intermediate_size"], shared_gate=True)
        shared = "shared_expert"
        p["shared_expert_gate"] = {"kernel": w["shared_expert_gate.weight"].T}
    else:
        settings = dict(num_experts=c["num_local_experts"], router="sigmoid",
                        score_correction_bias=True, n_group=c["n_group"],
                        topk_group=c["topk_group"],
                        routed_scaling_factor=c["routed_scaling_factor"],
                        d_shared=c["n_shared_experts"] * F)
        shared = "shared_experts"
        p["score_bias"] = w["gate.e_score_correction_bias"]
    p["shared_expert"] = {n: {"kernel": w[f"{shared}.{hf}.weight"].T}
                          for n, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"),
                                        ("w_out", "down_proj"))}
    m = MoE(c["hidden_size"], top_k=c["num_experts_per_tok"], d_expert=F,
            norm_topk_prob=c["norm_topk_prob"], **settings)
    assert jax.tree.map(np.shape, p) == jax.tree.map(np.shape, param_shapes(m))
    return m, jax.tree.map(jnp.asarray, p), w


@pytest.mark.parametrize("kind", HF_KINDS)
def test_matches_transformers_block(kind):
    """transformers' block's output, router logits and routing (experts, weights) in float32,
    from both dispatches; for Qwen3-Next the load-balance loss over the fixture's two inputs (as two
    layers) is transformers' `load_balancing_loss_func`, for Kimi (whose LM adds no such loss)
    the same formula with P the normalised sigmoid scores."""
    m, p, w = from_hf(kind)

    @jax.jit
    def run(p, x, x2):
        capture = lambda mdl, name: mdl.name == "router"
        out = {}
        for impl in ("dense", "ragged"):
            (y, state) = m.clone(dispatch=impl).apply(
                {"params": p}, x, mutable=[AUX_POOLED, "intermediates"],
                capture_intermediates=capture)
            out[impl] = y
        stats = [m.apply({"params": p}, a, mutable=[AUX_POOLED])[1][AUX_POOLED][moe.LOSS][0]
                 for a in (x, x2)]
        logits = state["intermediates"]["router"]["__call__"][0]
        routed = moe.route(logits.reshape(-1, m.num_experts), top_k=m.top_k, router=m.router,
                           norm_topk_prob=m.norm_topk_prob,
                           routed_scaling_factor=m.routed_scaling_factor,
                           bias=p.get("score_bias"), n_group=m.n_group,
                           topk_group=m.topk_group)
        loss = moe.load_balance_loss({"aux_loss_weight": 1.0}, jnp.stack(stats))
        return out, logits, routed, loss

    out, logits, (weights, experts, _), loss = run(p, w["x"], w["x2"])
    for impl, y in out.items():
        assert rel_err(y, w["y"]) < 1e-5, (impl, rel_err(y, w["y"]))
    assert rel_err(logits.reshape(-1, m.num_experts), w["router_logits"]) < 1e-5
    order, want = np.argsort(experts, -1), np.argsort(w["top_k_index"], -1)
    np.testing.assert_array_equal(np.take_along_axis(experts, order, -1),
                                  np.take_along_axis(w["top_k_index"], want, -1))
    np.testing.assert_allclose(np.take_along_axis(weights, order, -1),
                               np.take_along_axis(w["top_k_weights"], want, -1), rtol=1e-5)
    if m.router == "sigmoid":   # the fixture's bias and groups change the choice
        _, chosen, _ = oracle(m, p, w["x"])
        assert chosen == [tuple(sorted(e)) for e in w["top_k_index"]]
        for other in ({"score_correction_bias": False}, {"n_group": 1, "topk_group": 1}):
            if other.get("n_group") != m.n_group:
                q = {k: v for k, v in p.items() if k != "score_bias" or "n_group" in other}
                assert oracle(m.clone(**other), q, w["x"])[1] != chosen, other
    if m.router == "softmax":
        np.testing.assert_allclose(loss, w["aux_loss"], rtol=1e-5)
    else:
        _, _, s1 = oracle(m, p, w["x"])
        _, _, s2 = oracle(m, p, w["x2"])
        E = m.num_experts
        want = E * np.sum((s1[:E] + s2[:E]) / 2 * (s1[E:] + s2[E:]) / 2)
        np.testing.assert_allclose(loss, want, rtol=1e-5)


# --- in the model -----------------------------------------------------------------------------

def test_aux_loss_pools_the_layers_and_reaches_the_router(rng):
    """Two moe layers through mem_lm.apply_with_aux: the loss is transformers'
    over both layers' router logits (captured from the forward) times aux_loss_weight, and its
    gradient reaches both routers."""
    weight = 0.3
    cfg = ModelConfig(vocab_size=37, d_model=D, num_layers=2, num_heads=2, pattern=("swa",),
                      channel_pattern=("moe",), chunk_size=4, init_std=0.2,
                      mixers={"swa": {"window": 3},
                              "moe": dict(num_experts=4, top_k=2, d_expert=8,
                                          aux_loss_weight=weight)})
    model = LanguageModel(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    capture = lambda mdl, name: mdl.name == "router" and name == "__call__"

    @jax.jit
    def run(p):
        def loss(p):
            _, aux = apply_with_aux(model, {"params": p}, tokens)
            return sum(aux["losses"].values()), aux
        inter = model.apply({"params": p}, tokens, capture_intermediates=capture,
                            mutable=["intermediates"])[1]["intermediates"]
        return jax.value_and_grad(loss, has_aux=True)(p), inter

    ((loss, aux), grad), inter = run(params["params"])
    assert set(aux["losses"]) == {"moe_load_balance"}
    assert set(aux["metrics"]) == {"moe_max_load", "moe_router_entropy"}
    logits = np.stack([inter[f"layer_{i}"]["mlp"]["router"]["__call__"][0] for i in range(2)])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[..., :2]
    share = np.eye(4)[top].sum(-2).reshape(-1, 4).mean(0)
    want = weight * 4 * np.sum(share * probs.reshape(-1, 4).mean(0))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for i in range(2):
        assert np.abs(np.asarray(grad[f"layer_{i}"]["mlp"]["router"]["kernel"])).max() > 0


def test_default_width_and_param_names():
    """d_expert None: the SwiGLU width over top_k, rounded up to 8; the parameters a
    transformers import fills."""
    cfg = ModelConfig(vocab_size=11, d_model=48, num_layers=1, num_heads=2,
                      channel_pattern=("moe",), mixers={"moe": dict(top_k=3, d_shared=8,
                                                                    shared_gate=True)})
    assert moe.d_expert(cfg.shared(), cfg.settings("moe")) == 48   # 8/3 · 48 / 3 = 42.7
    shapes = param_shapes(moe.MoE(48, d_expert=48, top_k=3, d_shared=8, shared_gate=True))
    assert set(shapes) == {"router", "w_gate", "w_up", "w_out", "shared_expert",
                           "shared_expert_gate"}


@pytest.mark.parametrize("field, value, extra", [
    ("top_k", 9, {}), ("num_experts", 0, {}), ("router", "relu", {}), ("dispatch", "gmm", {}),
    ("routed_scaling_factor", 0.0, {}), ("aux_loss_weight", -1.0, {}), ("d_shared", -1, {}),
    ("shared_gate", True, {}), ("score_correction_bias", True, {}),
    ("n_group", 2, {}), ("n_group", 3, {"router": "sigmoid"}),
    ("n_group", 8, {"router": "sigmoid"}), ("topk_group", 2, {}),
    ("top_k", 5, {"router": "sigmoid", "n_group": 4, "topk_group": 2}),
    ("d_expert", 0, {})])
def test_bad_settings_name_the_field(field, value, extra):
    with pytest.raises(ValueError, match=f"ModelConfig.mixers.moe.{field}: "):
        ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2,
                    channel_pattern=("moe",), mixers={"moe": {**extra, field: value}})
