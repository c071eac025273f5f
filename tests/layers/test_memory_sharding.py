"""memory_plus on 8 simulated CPU devices (mesh data=2, fsdp=1, tensor=4; configs/base.py's
default rules, so the value table [N, d_model] has its columns split over tensor) equals one
device in the loss, the logits and every gradient, and each device holds a quarter of the
table's bytes (and of its gradient's).

The 8 devices need XLA_FLAGS before JAX starts, so the test runs this file as a subprocess
(as tests/layers/test_mom_sharding.py does)."""
import json
import re
import sys
from pathlib import Path

from simulated_devices import run_with_devices

MESH = (2, 1, 4)           # data, fsdp, tensor


def worker(out):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs.base import get_config
    from layers.memory import SHARED_VALUES
    from mem_lm import LanguageModel, ModelConfig, apply_with_aux
    from train.config import logical_axis_rules
    from train.sharding import logical_to_shardings, make_mesh

    assert jax.device_count() == 8, jax.devices()
    config = get_config()
    rules = logical_axis_rules(config)
    mesh = make_mesh(MESH)
    cfg = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, pattern=("attn",),
                      channel_pattern=("swiglu", "memory_plus"), init_std=0.3,
                      mixers={"memory_plus": dict(n_keys=8, heads=4, topk=4)})
    model = LanguageModel(cfg)
    B, T = 4, 8
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens[:1])["params"])
        shardings = logical_to_shardings(boxed, mesh, config)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                          nn.meta.unbox(boxed))

    def loss_fn(p, tok, tgt):
        logits, aux = apply_with_aux(model, {"params": p}, tok)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))
        return ce, (logits, aux["metrics"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss1, (logits1, metrics1)), grads1 = jax.jit(grad_fn)(
        jax.device_put(params, jax.devices()[0]), tokens, targets)
    batch = NamedSharding(mesh, P(("data", "fsdp"), None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        ps = jax.device_put(params, shardings)
        args = (ps, jax.device_put(tokens, batch), jax.device_put(targets, batch))
        step = jax.jit(grad_fn, in_shardings=(shardings, batch, batch),
                       out_shardings=((None, (None, None)), shardings))
        hlo = step.lower(*args).compile().as_text()
        (loss8, (logits8, metrics8)), grads8 = step(*args)

    table, dtable = ps[SHARED_VALUES], grads8[SHARED_VALUES]
    maxrel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                / (np.max(np.abs(np.asarray(b))) + 1e-30))
    flat1 = dict(jax.tree_util.tree_flatten_with_path(grads1)[0])
    result = dict(
        loss=[float(loss1), float(loss8)], logits=maxrel(logits8, logits1),
        usage=[float(metrics1["memory_key_usage"]), float(metrics8["memory_key_usage"])],
        grads={jax.tree_util.keystr(k): maxrel(g, flat1[k])
               for k, g in jax.tree_util.tree_flatten_with_path(grads8)[0]},
        table_spec=[str(a) for a in table.sharding.spec],
        table_bytes=table.nbytes,
        # A whole table on one device: an all-gather (or all-reduce) producing f32[N, D].
        whole_table=re.findall(rf"= f32\[{table.shape[0]},{table.shape[1]}\]\S* "
                               r"(?:all-gather|all-reduce)\(", hlo),
        collectives=len(re.findall(r" (?:all-gather|all-reduce)\(", hlo)),
        shard_bytes=sorted({s.data.nbytes for s in table.addressable_shards}),
        grad_shard_bytes=sorted({s.data.nbytes for s in dtable.addressable_shards}),
    )
    Path(out).write_text(json.dumps(result, indent=1))


def test_value_table_split_over_tensor_equals_one_device(tmp_path):
    out = tmp_path / "out.json"
    run_with_devices(__file__, out)
    r = json.loads(out.read_text())
    # The table's columns over tensor: a quarter of its bytes (and its gradient's) per device.
    assert r["table_spec"] == ["None", "tensor"], r["table_spec"]
    assert r["shard_bytes"] == r["grad_shard_bytes"] == [r["table_bytes"] // MESH[2]], r
    # Never gathered whole (forward or backward): each device reads its own columns.
    assert r["collectives"] > 0 and not r["whole_table"], r["whole_table"]
    assert abs(r["loss"][0] - r["loss"][1]) < 1e-5 * abs(r["loss"][0]), r["loss"]
    assert r["logits"] < 1e-5, r["logits"]
    assert r["usage"][0] == r["usage"][1] > 0, r["usage"]
    for n, err in r["grads"].items():
        assert err < 3e-5, (n, err)


if __name__ == "__main__":
    worker(sys.argv[1])
