"""Auxiliary outputs: a mechanism's sowed loss (per layer, and pooled over the layers) reaches
the gradient and its metrics reach the logs, with and without scan_layers and remat (a throwaway
mechanism registered here)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import registry
from layers.common import init
from layers.registry import AUX_LOSS, AUX_METRICS, AUX_POOLED, Mechanism, Setting
from mem_lm import LanguageModel, ModelConfig, apply_with_aux

WEIGHT = 0.37
POOLED_WEIGHT = 0.05


def pooled_square(settings, stats):
    """The toy pooled loss: POOLED_WEIGHT · (the mean over layers of Σ W)²; its gradient with
    respect to each layer's W is 2 · POOLED_WEIGHT · mean / layers (a sum of per-layer squares
    would give 2 · POOLED_WEIGHT · Σ W_l instead)."""
    return POOLED_WEIGHT * jnp.mean(stats[:, 0]) ** 2


class ToyAux(nn.Module):
    """y = x W; sows the loss weight · ||W||² (gradient 2 · weight · W), the pooled statistic
    Σ W (`pooled_square`) and the metric mean |y|."""
    d_model: int
    weight: float

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        w = self.param("kernel", init(0.3, ("embed", "mlp")), (self.d_model, self.d_model))
        y = x @ w
        self.sow(AUX_LOSS, "toy_l2", self.weight * jnp.sum(w * w))
        self.sow(AUX_POOLED, "toy_pooled", jnp.sum(w)[None])
        self.sow(AUX_METRICS, "toy_usage", jnp.mean(jnp.abs(y)))
        return y, (None if cache is None else {})

    def init_cache(self, batch, max_len):
        return {}


@pytest.fixture(scope="module")
def toy():
    registry.register(Mechanism(
        "toy_aux", "token", lambda shared, s, name: ToyAux(shared.d_model, s["weight"], name=name),
        {"weight": Setting(1.0, float, "aux loss weight")}, summary="test mechanism",
        pooled_losses={"toy_pooled": pooled_square}))
    yield
    registry.unregister("toy_aux")


def _config(**kw):
    return ModelConfig(vocab_size=23, d_model=8, num_layers=2, num_heads=2, pattern=("toy_aux",),
                       channel_pattern=("none",), mixers={"toy_aux": {"weight": WEIGHT}}, **kw)


def _toy_kernels(params):
    """The toy layers' kernels {path: array}: the only mixer params named `kernel` directly
    (stacked over groups under scan_layers)."""
    return {k: v for k, v in ((jax.tree_util.keystr(p), v)
                              for p, v in jax.tree_util.tree_leaves_with_path(params))
            if k.endswith("['mixer']['kernel']")}


@pytest.mark.parametrize("kw", [dict(), dict(scan_layers=True, remat="dots"),
                                dict(remat="full")], ids=["plain", "scan+remat", "remat"])
def test_sowed_loss_reaches_the_gradient(toy, kw, rng):
    cfg = _config(**kw)
    model = LanguageModel(cfg)
    tokens = jnp.asarray(rng.integers(0, 23, (2, 7)), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens))["params"]

    def xent(logits):
        lp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

    def with_aux(p):
        logits, aux = apply_with_aux(model, {"params": p}, tokens)
        return xent(logits) + sum(aux["losses"].values()), aux

    (_, aux), g_total = jax.jit(jax.value_and_grad(with_aux, has_aux=True))(params)
    g_lm = jax.jit(jax.grad(lambda p: xent(model.apply({"params": p}, tokens))))(params)

    kernels = _toy_kernels(params)
    assert len(kernels) == (1 if cfg.scan_layers else 2)   # two toy layers
    # The loss is summed over the two toy layers; the pooled one is formed from both layers'
    # statistics together; the metric is their mean.
    np.testing.assert_allclose(
        aux["losses"]["toy_l2"], WEIGHT * sum(float(jnp.sum(k * k)) for k in kernels.values()),
        rtol=1e-5)
    mean_sum = sum(float(jnp.sum(k)) for k in kernels.values()) / 2
    np.testing.assert_allclose(aux["losses"]["toy_pooled"], POOLED_WEIGHT * mean_sum ** 2,
                               rtol=1e-5)
    assert set(aux["metrics"]) == {"toy_usage"} and float(aux["metrics"]["toy_usage"]) > 0
    # The gradient difference is exactly the aux losses', 2 · weight · W + 2 · pooled weight ·
    # mean / 2, and only there.
    diff = jax.tree.map(jnp.subtract, g_total, g_lm)
    for path, d in jax.tree_util.tree_leaves_with_path(diff):
        key = jax.tree_util.keystr(path)
        want = (2 * WEIGHT * kernels[key] + POOLED_WEIGHT * mean_sum if key in kernels
                else jnp.zeros_like(d))
        np.testing.assert_allclose(d, want, atol=1e-5, err_msg=key)


def test_trainer_adds_the_loss_and_logs_the_metrics(toy, tmp_path):
    from configs import base
    from train.config import resolve
    from train.data import make_train_iterator
    from train.loop import Trainer, run

    c = base.get_config()
    c.model = base.model_config(d_model=8, num_layers=2, num_heads=2, pattern=("toy_aux",),
                                channel_pattern=("none",), scan_layers=True,
                                mixers={"toy_aux": {"weight": WEIGHT}})
    c.data.update(source="mqar", vocab_size=64, num_kv_pairs=2)
    # Two micro-batches: the accumulation path carries the aux values too.
    c.train.update(steps=3, batch_size=4, grad_accum_steps=2, seq_len=16, log_every=1,
                   eval_every=0, eval_batches=0)
    c.checkpoint.enabled = False
    c.logging.update(tensorboard=False, progress_bar=False)
    trainer = Trainer(resolve(c, num_devices=jax.device_count()), str(tmp_path))
    params = trainer.init_state(0)["params"]
    batch = trainer.global_batch(next(make_train_iterator(trainer.config)))
    # d(objective)/dW of the trainer (mean over target tokens) = d(xent)/dW + 2 · weight · W
    # + the pooled loss's 2 · pooled weight · mean / 2 (W: both layers' kernels, stacked).
    def mean_over_targets(which):   # _forward's objective (0) or its xent sum (aux[2])
        def f(p):
            objective, aux = trainer._forward(p, batch)
            return (objective if which == 0 else aux[2]) / aux[0]
        return jax.jit(jax.grad(f))

    with trainer.context():
        grad, g_xent = mean_over_targets(0)(params), mean_over_targets(2)(params)
    w = params["groups"]["block_0"]["mixer"]["kernel"]
    np.testing.assert_allclose(grad["groups"]["block_0"]["mixer"]["kernel"]
                               - g_xent["groups"]["block_0"]["mixer"]["kernel"],
                               2 * WEIGHT * w + POOLED_WEIGHT * jnp.sum(w) / 2, atol=1e-5)
    run(c, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r for r in rows if "aux/toy_l2" in r]
    assert logged and all(r["aux/toy_l2"] > 0 and r["aux/toy_usage"] > 0 for r in logged)
