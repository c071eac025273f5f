"""`moe` on 8 simulated CPU devices (mesh data=2, fsdp=2, tensor=2; configs/base.py's default
logical rules: expert -> tensor, embed -> fsdp, mlp -> tensor) equals one device: the logits,
the cross-entropy + load-balance loss and every gradient, with both dispatches (dense and
ragged); and the experts' kernels really are split by expert over `tensor` (each device holds
E / 2 whole experts, their embed axis over fsdp).

The 8 devices need XLA_FLAGS before JAX starts, so the test runs this file as a subprocess
(as test_mom_sharding.py does)."""
import json
import sys
from pathlib import Path

import pytest
from simulated_devices import run_with_devices

MESH = (2, 2, 2)           # data, fsdp, tensor
E = 8                      # experts: 4 per tensor shard


def worker(out):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs.base import get_config
    from mem_lm import LanguageModel, ModelConfig, apply_with_aux
    from train.config import logical_axis_rules
    from train.sharding import logical_to_shardings, make_mesh

    assert jax.device_count() == 8, jax.devices()
    config = get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = MESH
    rules = logical_axis_rules(config)
    names = [n for n, _ in rules]
    # expert and mlp both map to tensor: the rule listed first wins an array's mesh axis.
    assert dict(rules)["expert"] == "tensor" and names.index("expert") < names.index("mlp")
    mesh = make_mesh(MESH)
    B, T = 4, 8
    rng = np.random.default_rng(0)
    result = {}
    for dispatch in ("dense", "ragged"):
        cfg = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4,
                          pattern=("swa",), channel_pattern=("moe",), init_std=0.2,
                          mixers={"swa": {"window": 4},
                                  "moe": dict(num_experts=E, top_k=2, d_expert=8,
                                              router="sigmoid", score_correction_bias=True,
                                              n_group=2, topk_group=1, d_shared=8,
                                              shared_gate=True, aux_loss_weight=0.5,
                                              dispatch=dispatch)})
        model = LanguageModel(cfg)
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
        targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
        with nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens[:1])["params"])
            shardings = logical_to_shardings(boxed, mesh, config)
        params = jax.jit(lambda k: nn.meta.unbox(model.init(k, tokens[:1])["params"]))(
            jax.random.PRNGKey(1))
        params = jax.tree_util.tree_map_with_path(    # a bias that changes the choice
            lambda p, a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape)
            if "score_bias" in jax.tree_util.keystr(p) else a, params)

        def loss_fn(p, tok, tgt):
            logits, aux = apply_with_aux(model, {"params": p}, tok)
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))
            return ce + sum(aux["losses"].values()), (logits, aux["metrics"])

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        one = jax.devices()[0]
        (loss1, (logits1, metrics)), grads1 = jax.jit(grad_fn)(jax.device_put(params, one),
                                                              tokens, targets)
        batch = NamedSharding(mesh, P(("data", "fsdp"), None))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            ps = jax.device_put(params, shardings)
            (loss8, (logits8, _)), grads8 = jax.jit(
                grad_fn, in_shardings=(shardings, batch, batch),
                out_shardings=((None, None), shardings))(
                ps, jax.device_put(tokens, batch), jax.device_put(targets, batch))

        def leaves(tree):
            return {jax.tree_util.keystr(k): v
                    for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

        maxrel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                    / (np.max(np.abs(np.asarray(b))) + 1e-30))
        result[dispatch] = dict(
            params={n: dict(spec=[str(a) for a in x.sharding.spec], shape=list(x.shape),
                            shards=sorted({tuple(s.data.shape) for s in x.addressable_shards}),
                            grad_spec=[str(a) for a in leaves(grads8)[n].sharding.spec])
                    for n, x in leaves(ps).items()},
            loss=[float(loss1), float(loss8)],
            max_load=float(metrics["moe_max_load"]),
            logits=maxrel(logits8, logits1),
            grads={n: maxrel(g, leaves(grads1)[n]) for n, g in leaves(grads8).items()},
            grad_norms={n: float(jnp.linalg.norm(g)) for n, g in leaves(grads1).items()})
    Path(out).write_text(json.dumps(result, indent=1))


@pytest.mark.slow   # an 8-device compile of two 2-layer models' forward and gradient
def test_moe_expert_axis_sharded_equals_one_device(tmp_path):
    out = tmp_path / "out.json"
    run_with_devices(__file__, out)
    for dispatch, r in json.loads(out.read_text()).items():
        params = r["params"]
        # (1) The experts' kernels [expert, embed, mlp] / [expert, mlp, embed] are split by
        # expert over tensor (E / 2 whole experts per device), embed over fsdp.
        kernels = [n for n in params if n.split("'")[-2] in ("w_gate", "w_up", "w_out")
                   and "shared_expert" not in n]
        assert len(kernels) == 6, sorted(params)
        for n in kernels:
            p = params[n]
            assert p["shape"][0] == E and p["spec"][0] == "tensor", (dispatch, n, p)
            assert "tensor" not in p["spec"][1:] and "fsdp" in p["spec"], (dispatch, n, p)
            assert all(s[0] == E // MESH[2] for s in p["shards"]), (dispatch, n, p)
            assert p["grad_spec"] == p["spec"], (dispatch, n, p)
        bias = [n for n in params if "score_bias" in n]
        assert len(bias) == 2 and all(params[n]["spec"] == ["tensor"] for n in bias)
        # (2) Equal to one device to float32 rounding: logits, loss, every gradient (the
        # score bias has none: it only chooses).
        assert r["logits"] < 1e-5, (dispatch, r["logits"])
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5 * abs(r["loss"][0]), (dispatch, r["loss"])
        for n, err in r["grads"].items():
            assert err < 3e-5, (dispatch, n, err)
            assert (r["grad_norms"][n] > 0) == ("score_bias" not in n), (dispatch, n)
        assert r["max_load"] < E / 2, r["max_load"]      # not every token to one pair


if __name__ == "__main__":
    worker(sys.argv[1])
