"""Sparse mixture-of-experts MLP (`moe`, a channel mixer): E SwiGLU experts of width d_expert,
each token routed to top_k of them, plus optional shared experts every token goes through. The
settings cover the MoE blocks of the two released hybrids (oracle: transformers' modelling code,
tests/fixtures/make_hf_moe_fixtures.py):

  Qwen3-Next (`Qwen3NextSparseMoeBlock`): router "softmax", norm_topk_prob, a shared expert of
      its own width (d_shared = shared_expert_intermediate_size) behind a sigmoid gate
      (shared_gate), the Switch/Mixtral load-balance loss (aux_loss_weight =
      router_aux_loss_coef).
  Kimi Linear (`KimiLinearMoE`, DeepSeek-V3's router): router "sigmoid" with the score
      correction bias (score_correction_bias), group-limited top-k (n_group, topk_group),
      norm_topk_prob, routed_scaling_factor, ungated shared experts (d_shared =
      n_shared_experts · moe_intermediate_size: n SwiGLUs summed are one of n times the width).

The router, in float32 (Kimi's; Qwen3-Next projects in the compute dtype and takes the softmax
in float32), logits z = W_r x [E]:

  "softmax"  p = softmax(z); the top_k of p; weights = the chosen p, divided by their sum with
             norm_topk_prob.
  "sigmoid"  s = sigmoid(z); the choice ranks s + b (b: the score-correction bias, a parameter
             `score_bias` [E] with score_correction_bias, else 0). With n_group > 1 the E
             experts form n_group groups of E / n_group, a group scores the sum of its two best
             s + b, and only the topk_group best groups' experts may be chosen. weights = the
             chosen s (without b), divided by (their sum + 1e-20) with norm_topk_prob.

then weights · routed_scaling_factor, and y = Σ_k weights_k · expert_{i_k}(x) (+ the shared
experts: SwiGLU of width d_shared, times sigmoid(w_g · x) with shared_gate). An expert is
w_out(SiLU(x·w_gate) ⊙ x·w_up).

The bias b only chooses: it has no gradient (the selection is discrete) and no weight decay
(its name matches the optimiser's `bias` pattern). DeepSeek-V3 moves it after each step by
±γ towards balanced loads (aux-loss-free balancing); that update is not built here (a loaded
checkpoint's bias is used as it is; trained from scratch it stays 0).

Compute (`dispatch`): "dense" runs every token through every expert (T·E expert rows) and sums the
outputs weighted by the routing weights (0 for the experts not chosen: the same function,
exact); "ragged" sorts the T·top_k (token, expert) slots by expert and runs each expert on its
own tokens with `jax.lax.ragged_dot` (a grouped matmul: T·top_k rows), then unsorts and sums
each token's top_k outputs. "auto": ragged where XLA runs ragged_dot as a grouped matmul (TPU,
`layers.mom.ragged_dot_is_native`), dense elsewhere (CPU and GPU lower it to a masked dense
product per expert, T·top_k·E rows, more than dense's T·E). Both are dropless: no capacity,
every chosen expert sees its token, in training and inference alike (so decoding equals the
full forward, and a token's output never depends on other tokens).

Load balance (`registry.AUX_POOLED`, "moe_load_balance"): one loss over every moe layer's
router together, transformers' `load_balancing_loss_func` (Switch Transformers eqs. 4-6, as
Mixtral and Qwen3-Next compute it over all layers' router logits):

    moe_load_balance = aux_loss_weight · E · Σ_e F_e · P_e,

F_e the share of all layers' tokens that chose expert e (Σ_e F_e = top_k) and P_e their mean
router probability for e (softmax: p; sigmoid: s / Σ s, DeepSeek-V3's normalised affinities,
the P of its sequence-wise balance loss, here pooled over the batch and layers as the Switch
loss is). Each layer sows its [F, P]; `load_balance_loss` pools them. Metrics
(`registry.AUX_METRICS`, averaged over layers): `moe_max_load` (max_e F_e · E / top_k: 1 when
balanced, E / top_k when one expert takes every token's slot) and `moe_router_entropy` (nats,
of P per token).

Sharding: the experts' kernels [expert, embed, mlp] and [expert, mlp, embed] (and the bias
[expert]) carry the logical axis `expert`; configs/base.py maps it to the tensor mesh axis, so
each tensor shard holds E / tensor whole experts (the mlp axis, also on tensor, yields to it:
`expert` sorts before `mlp` in the rules). With the batch over data and fsdp, the tokens of a
tensor group are the same on each of its devices: each runs its experts on them and the
outputs are summed over tensor, the all-reduce tensor-parallel MLPs already do.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import constrain, dense, init
from layers.mlp import SwiGLU
from layers.mom import ragged_dot_is_native
from layers.registry import (AUX_METRICS, AUX_POOLED, MAX_INT, Mechanism, Setting,
                             SettingError, Shared, positive_int, register)

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("auto", "dense", "ragged")
LOSS = "moe_load_balance"


def route(logits, *, top_k: int, router: str, norm_topk_prob: bool,
          routed_scaling_factor: float = 1.0, bias=None, n_group: int = 1, topk_group: int = 1):
    """Top-k routing of router logits [..., E] (float32 or wider).

    Returns (weights [..., top_k], experts [..., top_k] int32, probs [..., E]): the routing
    weights (scaled), the chosen experts, and the router's probabilities for the load balance
    (softmax; sigmoid scores normalised to sum to 1)."""
    E = logits.shape[-1]
    if router == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs, choice = scores, scores
    elif router == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        choice = scores if bias is None else scores + bias.astype(scores.dtype)
    else:
        raise ValueError(f"router: must be one of {ROUTERS}, got {router!r}")
    if n_group > 1:
        grouped = choice.reshape(choice.shape[:-1] + (n_group, E // n_group))
        group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)           # [..., G]
        best = jax.lax.top_k(group_score, topk_group)[1]
        keep = jnp.any(best[..., None] == jnp.arange(n_group), axis=-2)      # [..., G]
        choice = jnp.where(keep[..., None], grouped, -jnp.inf).reshape(choice.shape)
    experts = jax.lax.top_k(choice, top_k)[1]
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if norm_topk_prob:
        total = jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights / (total + 1e-20 if router == "sigmoid" else total)
    return weights * routed_scaling_factor, experts.astype(jnp.int32), probs


def dense_experts(x, weights, experts, w_gate, w_up, w_out):
    """Σ_k weights_k · expert_{experts_k}(x) for x [N, d] by running every token through every
    expert: the routing weights scattered to [N, E] (0 for experts not chosen) scale each
    expert's hidden activations before the down projection. In x's dtype, summed in float32."""
    E = w_gate.shape[0]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    combine = jnp.sum(jax.nn.one_hot(experts, E, dtype=acc) * weights[..., None].astype(acc), -2)
    h = (jax.nn.silu(jnp.einsum("nd,edf->nef", x, w_gate))
         * jnp.einsum("nd,edf->nef", x, w_up))
    h = (h.astype(acc) * combine[..., None]).astype(x.dtype)
    return jnp.einsum("nef,efd->nd", h, w_out, preferred_element_type=acc)


def ragged_experts(x, weights, experts, w_gate, w_up, w_out):
    """The same function as `dense_experts` with each expert run on its own tokens: the N·top_k
    (token, expert) slots sorted by expert, one `jax.lax.ragged_dot` per projection over the
    expert groups, then each token's top_k outputs gathered back and summed in float32."""
    N, k = experts.shape
    E = w_gate.shape[0]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)                       # slots grouped by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[order // k]
    h = (jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes))
         * jax.lax.ragged_dot(xs, w_up, sizes))
    ys = jax.lax.ragged_dot(h, w_out, sizes, preferred_element_type=acc)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(N * k, dtype=order.dtype))
    return jnp.sum(ys[back].reshape(N, k, -1) * weights[..., None].astype(acc), axis=1)


class MoE(nn.Module):
    d_model: int
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 32
    router: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    d_shared: int = 0
    shared_gate: bool = False
    dispatch: str = "auto"
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, T, d = x.shape
        E, F = self.num_experts, self.d_expert
        acc = jnp.promote_types(self.dtype, jnp.float32)
        logits = dense(E, ("embed", None), std=self.init_std, dtype=acc, name="router")(
            x.astype(acc))
        bias = (self.param("score_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("expert",)), (E,), jnp.float32)
            if self.score_correction_bias else None)
        weights, experts, probs = route(
            logits, top_k=self.top_k, router=self.router, norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor, bias=bias, n_group=self.n_group,
            topk_group=self.topk_group)
        self._sow_aux(experts, probs)

        param = lambda n, shape, axes: self.param(n, init(self.init_std, axes), shape,
                                                  jnp.float32).astype(self.dtype)
        w_gate = param("w_gate", (E, d, F), ("expert", "embed", "mlp"))
        w_up = param("w_up", (E, d, F), ("expert", "embed", "mlp"))
        w_out = param("w_out", (E, F, d), ("expert", "mlp", "embed"))
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = "ragged" if ragged_dot_is_native() else "dense"
        fn = ragged_experts if dispatch == "ragged" else dense_experts
        y = fn(x.astype(self.dtype).reshape(B * T, d), weights.reshape(B * T, -1),
               experts.reshape(B * T, -1), w_gate, w_up, w_out).reshape(B, T, d)
        if self.d_shared:
            shared = SwiGLU(d, self.d_shared, self.init_std, self.dtype,
                            name="shared_expert")(x).astype(acc)
            if self.shared_gate:
                gate = dense(1, ("embed", None), std=self.init_std, dtype=acc,
                             name="shared_expert_gate")(x.astype(acc))
                shared = jax.nn.sigmoid(gate) * shared
            y = y + shared
        return constrain(y.astype(self.dtype), ("batch", "length", "embed"))

    def _sow_aux(self, experts, probs):
        if self.is_initializing():
            # As mom: not into init's variables (they would count twice in apply_with_aux).
            return
        stats = balance_stats(experts, probs)
        E = self.num_experts
        self.sow(AUX_POOLED, LOSS, stats)
        self.sow(AUX_METRICS, "moe_max_load", jnp.max(stats[:E]) * E / self.top_k)
        entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
        self.sow(AUX_METRICS, "moe_router_entropy", jnp.mean(entropy))


def balance_stats(experts, probs):
    """A layer's load-balance statistics [F (E), P (E)] float32 from its chosen experts
    [..., top_k] and router probabilities [..., E]: the share of its tokens that chose each
    expert (Σ F = top_k) and the mean probabilities."""
    E = probs.shape[-1]
    chosen = jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32), axis=-2)
    share = jnp.mean(chosen.reshape(-1, E), axis=0)
    return jnp.concatenate([share, jnp.mean(probs.reshape(-1, E), axis=0).astype(jnp.float32)])


def load_balance_loss(settings, stats):
    """transformers' `load_balancing_loss_func` over all moe layers together, from each layer's
    sowed [F (E), P (E)] (stats [layers, 2E]): aux_loss_weight · E · Σ_e mean(F_e) · mean(P_e)
    (every layer sees the same number of tokens, so the pooled shares are the layers' means)."""
    E = stats.shape[-1] // 2
    share, prob = jnp.mean(stats[:, :E], axis=0), jnp.mean(stats[:, E:], axis=0)
    return settings["aux_loss_weight"] * E * jnp.sum(jax.lax.stop_gradient(share) * prob)


def d_expert(shared: Shared, s) -> int:
    """The experts' width: d_expert, or by default the SwiGLU width (8/3 · d_model rounded up
    to 8) over top_k, rounded up to 8 (the routed experts then compute what one SwiGLU does)."""
    if s["d_expert"] is not None:
        return s["d_expert"]
    return -(-math.ceil(8 * shared.d_model / 3 / s["top_k"]) // 8) * 8


_SETTINGS = {
    "num_experts": Setting(8, int, "E: routed experts per layer"),
    "top_k": Setting(2, int, "experts each token is routed to"),
    "d_expert": Setting(None, int, "each expert's SwiGLU width (None: round_up(8/3 · d_model "
                        "/ top_k, 8))", optional=True),
    "router": Setting("softmax", str, "'softmax' (Qwen3-Next, Mixtral: top-k of softmax "
                      "probabilities) or 'sigmoid' (Kimi Linear, DeepSeek-V3: top-k of sigmoid "
                      "scores, with the bias and groups below)"),
    "norm_topk_prob": Setting(True, bool, "renormalise the chosen weights to sum to 1"),
    "routed_scaling_factor": Setting(1.0, float, "the routed output's scale (Kimi: 2.446)"),
    "score_correction_bias": Setting(False, bool, "sigmoid router: a per-expert bias added to "
                                     "the scores for choosing only (e_score_correction_bias)"),
    "n_group": Setting(1, int, "sigmoid router: expert groups for group-limited routing"),
    "topk_group": Setting(1, int, "sigmoid router: groups (by their two best scores) a token "
                          "may choose experts from"),
    "d_shared": Setting(0, int, "width of the shared expert every token goes through (0: "
                        "none; Kimi's n shared experts: n · d_expert)"),
    "shared_gate": Setting(False, bool, "scale the shared expert by sigmoid(w · x) "
                           "(Qwen3-Next)"),
    "aux_loss_weight": Setting(0.001, float, "weight of the load-balance loss E · Σ F_e P_e "
                               "over all moe layers together (Qwen3-Next's "
                               "router_aux_loss_coef)"),
    "dispatch": Setting("auto", str, "'dense' (every token through every expert), 'ragged' "
                    "(grouped matmul over expert-sorted tokens) or 'auto' (ragged on TPU)"),
}


def _check(shared: Shared, s) -> None:
    positive_int(s, "num_experts", "top_k", "d_expert", "n_group", "topk_group")
    E = s["num_experts"]
    if E > 2**16:
        raise SettingError("num_experts", f"must be <= 65536, got {E}")
    if s["top_k"] > E:
        raise SettingError("top_k", f"must be <= num_experts ({E}), got {s['top_k']}")
    if s["router"] not in ROUTERS:
        raise SettingError("router", f"must be one of {ROUTERS}, got {s['router']!r}")
    if s["dispatch"] not in DISPATCHES:
        raise SettingError("dispatch", f"must be one of {DISPATCHES}, got {s['dispatch']!r}")
    if not s["routed_scaling_factor"] > 0:
        raise SettingError("routed_scaling_factor",
                           f"must be > 0, got {s['routed_scaling_factor']}")
    if not s["aux_loss_weight"] >= 0:
        raise SettingError("aux_loss_weight", f"must be >= 0, got {s['aux_loss_weight']}")
    if not 0 <= s["d_shared"] <= MAX_INT:
        raise SettingError("d_shared", f"must be in [0, 2**31 - 1] (0: no shared expert), "
                                       f"got {s['d_shared']}")
    if s["shared_gate"] and not s["d_shared"]:
        raise SettingError("shared_gate", "gates the shared expert: needs d_shared > 0")
    for f in ("score_correction_bias",):
        if s[f] and s["router"] != "sigmoid":
            raise SettingError(f, f"is for router 'sigmoid' (DeepSeek-V3, Kimi), "
                                  f"got router {s['router']!r}")
    G = s["n_group"]
    if G > 1:
        if s["router"] != "sigmoid":
            raise SettingError("n_group", f"group-limited routing is for router 'sigmoid' "
                                          f"(DeepSeek-V3, Kimi), got router {s['router']!r}")
        if E % G or E // G < 2:
            raise SettingError("n_group", f"must divide num_experts ({E}) into groups of at "
                                          f"least 2 (a group scores its two best), got {G}")
    if s["topk_group"] > G:
        raise SettingError("topk_group", f"must be <= n_group ({G}), got {s['topk_group']}")
    if s["top_k"] > s["topk_group"] * (E // G):
        raise SettingError("top_k", f"must be <= topk_group · num_experts / n_group "
                                    f"({s['topk_group'] * (E // G)}: the experts of the chosen "
                                    f"groups), got {s['top_k']}")
    if s["d_expert"] is None and d_expert(shared, s) > MAX_INT:
        raise SettingError("d_expert", "the default width round_up(8/3 · d_model / top_k, 8) "
                                       "must be <= 2**31 - 1; set d_expert")


def _build(shared: Shared, s, name):
    return MoE(shared.d_model, num_experts=s["num_experts"], top_k=s["top_k"],
               d_expert=d_expert(shared, s), router=s["router"],
               norm_topk_prob=s["norm_topk_prob"],
               routed_scaling_factor=s["routed_scaling_factor"],
               score_correction_bias=s["score_correction_bias"], n_group=s["n_group"],
               topk_group=s["topk_group"], d_shared=s["d_shared"],
               shared_gate=s["shared_gate"], dispatch=s["dispatch"], init_std=shared.init_std,
               dtype=shared.dtype, name=name)


register(Mechanism("moe", "channel", _build, _SETTINGS, _check,
                   "sparse mixture-of-experts MLP: top-k routed SwiGLU experts (softmax or "
                   "sigmoid router) + shared experts (Qwen3-Next, Kimi Linear)",
                   pooled_losses={LOSS: load_balance_loss}))
