"""`mom` on 8 simulated CPU devices (mesh data=2, fsdp=1, tensor=4; configs/base.py's default
logical rules: heads and memory both -> tensor, memory first) equals one device: the forward, a
gradient of cross-entropy + load-balance loss, and a prefill + two one-token decode steps; and
the per-memory kernels, the router and the decode cache's per-memory entries really are split
over `tensor` (each device holds M / 4 memories).

The 8 devices need XLA_FLAGS before JAX starts, so the test runs this file as a subprocess
(as tests/train/test_training.py runs tests/train/sharding_worker.py)."""
import json
import sys
from pathlib import Path

import pytest
from simulated_devices import run_with_devices

MESH = (2, 1, 4)           # data, fsdp, tensor
M = 8                      # memories: 2 per tensor shard


def worker(out):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs.base import get_config
    from mem_lm import LanguageModel, ModelConfig, apply_with_aux, decode_step, init_cache
    from train.config import logical_axis_rules
    from train.sharding import logical_to_shardings, make_mesh

    assert jax.device_count() == 8, jax.devices()
    config = get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = MESH
    # The base rules map both heads and memory to tensor; a mesh axis serves one logical axis
    # of an array, and logical_axis_rules puts memory first, so the per-memory kernels
    # [embed, memory, heads, kv] are split by memory (heads stay whole there).
    rules = logical_axis_rules(config)
    assert rules[0] == ("memory", "tensor") and dict(rules)["heads"] == "tensor", rules
    mesh = make_mesh(MESH)

    cfg = ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=4, pattern=("mom",),
                      chunk_size=8, init_std=0.2, impl="xla",
                      mixers={"mom": dict(num_memories=M, top_k=2, aux_loss_weight=0.5)})
    model = LanguageModel(cfg)
    B, T = 4, 16
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)

    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens[:1])["params"])
        shardings = logical_to_shardings(boxed, mesh, config)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, tokens[:1])["params"]))(
        jax.random.PRNGKey(1))

    def loss_fn(p, tok, tgt):
        logits, aux = apply_with_aux(model, {"params": p}, tok)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))
        return ce + sum(aux["losses"].values()), (logits, aux["metrics"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    split = T - 2          # a prefill, then two one-token steps

    def decode(p, tok):
        cache = init_cache(cfg, tok.shape[0], T)
        first, cache = model.apply({"params": p}, tok[:, :split], cache=cache)
        outs = [first]
        for t in range(split, T):
            step, cache = decode_step(model, {"params": p}, tok[:, t], cache)
            outs.append(step[:, None])
        return jnp.concatenate(outs, 1), cache

    # One device.
    one = jax.devices()[0]
    p1 = jax.device_put(params, one)
    (loss1, (logits1, metrics)), grads1 = jax.jit(grad_fn)(p1, tokens, targets)
    dec1, _ = jax.jit(decode)(p1, tokens)

    # The mesh: params sharded by their logical axes, the batch over data.
    batch = NamedSharding(mesh, P(("data", "fsdp"), None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        ps = jax.device_put(params, shardings)
        tok_s, tgt_s = jax.device_put(tokens, batch), jax.device_put(targets, batch)
        (loss8, (logits8, _)), grads8 = jax.jit(grad_fn, in_shardings=(shardings, batch, batch),
                                           out_shardings=((None, None), shardings))(
            ps, tok_s, tgt_s)
        dec8, cache8 = jax.jit(decode, in_shardings=(shardings, batch))(ps, tok_s)

    def leaves(tree):
        return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    info = {}
    for name, x in leaves(ps).items():
        info[name] = dict(spec=[str(a) for a in x.sharding.spec], shape=list(x.shape),
                          shards=sorted({tuple(s.data.shape) for s in x.addressable_shards}))
    for name, x in leaves(grads8).items():
        info[name]["grad_spec"] = [str(a) for a in x.sharding.spec]
    maxrel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                / (np.max(np.abs(np.asarray(b))) + 1e-30))
    result = dict(
        params=info,
        loss=[float(loss1), float(loss8)],
        fractions=[float(metrics[f"mom_memory_{m}_fraction"]) for m in range(M)],
        logits=maxrel(logits8, logits1),
        decode=maxrel(dec8, dec1),
        decode_vs_full=maxrel(dec1, logits1),
        grads={n: maxrel(g, leaves(grads1)[n]) for n, g in leaves(grads8).items()},
        grad_norms={n: float(jnp.linalg.norm(g)) for n, g in leaves(grads1).items()},
        cache_specs={n: [str(a) for a in x.sharding.spec] for n, x in leaves(cache8).items()},
    )
    Path(out).write_text(json.dumps(result, indent=1))


@pytest.mark.slow   # ~50 s: an 8-device compile of mom's forward, gradient and decode
def test_mom_memory_axis_sharded_equals_one_device(tmp_path):
    out = tmp_path / "out.json"
    run_with_devices(__file__, out)
    r = json.loads(out.read_text())
    params = r["params"]

    # (1) The per-memory kernels [embed, memory, heads, (kv)] and the router [embed, memory]
    # are split along the memory axis over tensor: each device holds M / 4 memories.
    kernels = [n for n in params if n.endswith("['kernel']")
               and any(f"['{k}']" in n for k in ("k_proj", "v_proj", "b_proj", "a_proj"))
               and "shared" not in n]
    assert len(kernels) == 4, sorted(params)
    for n in kernels:
        p = params[n]
        assert p["shape"][1] == M, (n, p)
        assert p["spec"][1] == "tensor" and "tensor" not in p["spec"][2:], (n, p)
        assert all(s[1] == M // MESH[2] for s in p["shards"]), (n, p)
        assert p["grad_spec"] == p["spec"], (n, p)
    router = [n for n in params if "['router']['kernel']" in n]
    assert len(router) == 1 and params[router[0]]["shards"] == [[16, M // MESH[2]]], params[router[0]]

    # Every memory (so every tensor shard) gets tokens.
    assert min(r["fractions"]) > 0, r["fractions"]

    # (2) Equal to one device to float32 rounding: logits, the loss, every gradient, and a
    # prefill + one-token decode of the same tokens.
    assert r["logits"] < 1e-5, r["logits"]
    assert abs(r["loss"][0] - r["loss"][1]) < 1e-5 * abs(r["loss"][0]), r["loss"]
    for n, err in r["grads"].items():
        assert err < 3e-5 and r["grad_norms"][n] > 0, (n, err, r["grad_norms"][n])
    assert r["decode_vs_full"] < 1e-4, r["decode_vs_full"]
    assert r["decode"] < 1e-5, r["decode"]
    # The decode cache's routed entries [B, M, ...] come back split by memory over tensor.
    for n in ("state", "conv_k", "conv_v"):
        assert r["cache_specs"][f"['layers'][0]['{n}']"][:2] == ["data", "tensor"], r["cache_specs"]


if __name__ == "__main__":
    worker(sys.argv[1])
