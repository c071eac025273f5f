"""Context parallelism in the model and the trainer (mesh.context > 1: every sequence split into
contiguous slices over the `context` mesh axis; layers/common.py `over_context`).

On simulated CPU devices (a subprocess: XLA_FLAGS must be set before JAX starts,
tests/layers/simulated_devices.py):
  * a gdn + attn (GQA, sinks) + swa (window within a slice: the halo path) + la (short convs)
    model with mesh.context = 4 gives the one-device model's logits and every gradient, also
    on packed documents that cross the devices' slices, and its logits stay split over T;
  * (slow) the other supported mixers (deltanet, gla, retnet, lightning, ssd, kda, mla with
    RoPE: its latents all-gathered, swa with a window longer than a slice: the all-gather
    path), rows with more documents than the packed path holds (the token-scan fallback),
    Pallas kernels (interpret mode), data and context together, scan_layers + remat;
  * (slow) train.run on meshes {context: 2, data: 2} and {context: 4} logs the one-device
    run's losses (configs/tiny.py: gdn + swa on packed stdlib text).
In this process: the named config errors (a mixer without a context-parallel path, segment
recurrence, seq_len that does not split, rules.length not 'context', top-k attention).
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "_simulated_devices", Path(__file__).resolve().parents[1] / "layers" / "simulated_devices.py")
_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sim)

TOL = 1e-4      # max |context-parallel − one device| / max |one device|
B, T = 2, 32
# Packed rows (segment ids), as many documents as the recurrent ops' packed path holds
# (layers.common.docs_per_row: 3 for 32 tokens in chunks of 8): documents that span slices of
# 8 (D = 4) and 16 (D = 2) tokens, and one that starts on a slice boundary (16) and ends in
# padding (id 0).
SEGMENTS = [[1] * 5 + [2] * 19 + [3] * 8,
            [1] * 16 + [2] * 13 + [0] * 3]
# A row of more documents than that: the token-scan fallback.
MANY_DOCS = [[1] * 3 + [2] * 7 + [3] * 2 + [4] * 9 + [5] * 4 + [6] * 7,
             [1] * 30 + [2] * 2]

FAST = [dict(name="gdn_attn_swa_la", pattern=("gdn", "attn", "swa", "la"),
             mixers={"attn": {"num_kv_heads": 1, "sinks": True}, "swa": {"window": 6},
                     "la": {"short_conv": True}},
             context=4, segments=[SEGMENTS])]
SLOW = [dict(name="gdn_attn_swa_la_unpacked", pattern=("gdn", "attn", "swa", "la"),
             mixers=FAST[0]["mixers"], context=4, segments=[None]),
        dict(name="recurrent_family",
             pattern=("deltanet", "gla", "retnet", "lightning", "ssd", "kda"),
             mixers={"ssd": {"d_state": 8}, "gla": {"short_conv": True}}, context=4,
             segments=[None, SEGMENTS, MANY_DOCS],
             # At 0.3 ssd's A_log gradient cancels to a few 1e-3, where float32 summation
             # order alone (the one-device impls xla and reference) moves it by 3e-5.
             init_std=0.2),
        dict(name="long_window_pallas_mla", pattern=("gdn", "swa", "mla"), impl="pallas",
             mixers={"swa": {"window": 12}, "mla": {"rope": True, "kv_lora_rank": 12}},
             context=4, segments=[None, MANY_DOCS]),
        dict(name="data_and_context_scanned", pattern=("gdn", "attn"), context=2, data=2,
             scan_layers=True, remat="full", num_layers=4, segments=[SEGMENTS])]


# --------------------------------------------------------------------------- subprocess side
def model_case(case):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs.base import get_config
    from layers.common import docs_per_row, pack_rows
    from mem_lm import LanguageModel, ModelConfig
    from train.config import logical_axis_rules
    from train.sharding import batch_sharding, make_mesh

    config = get_config()
    rules = logical_axis_rules(config)
    data, context = case.get("data", 1), case["context"]
    mesh = make_mesh((data, 1, 1, context))
    cfg = ModelConfig(vocab_size=48, d_model=16, num_heads=2, pattern=case["pattern"],
                      num_layers=case.get("num_layers", len(case["pattern"])),
                      mixers=case.get("mixers", {}), impl=case.get("impl", "xla"),
                      scan_layers=case.get("scan_layers", False),
                      remat=case.get("remat", "none"), chunk_size=8,
                      init_std=case.get("init_std", 0.3))
    model = LanguageModel(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((B, T, cfg.vocab_size)), jnp.float32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:1])["params"])

    def loss(p, tok, seg):
        logits = model.apply({"params": p}, tok, segment_ids=seg)
        return jnp.sum(jnp.tanh(logits) * weights), logits

    step = jax.value_and_grad(loss, has_aux=True)
    maxrel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                / (np.max(np.abs(np.asarray(b))) + 1e-30))
    out = []
    for seg in case["segments"]:
        seg = None if seg is None else jnp.asarray(seg, jnp.int32)
        if seg is not None:   # the packed path, or (MANY_DOCS) the token-scan fallback
            fits = bool(pack_rows(seg, docs_per_row(T, cfg.chunk_size)).fits)
            assert fits == (seg.tolist() != MANY_DOCS), seg
        (l1, logits1), g1 = jax.jit(step)(params, tokens, seg)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sh = batch_sharding(config, mesh)
            (l2, logits2), g2 = jax.jit(step)(params, jax.device_put(tokens, sh),
                                              None if seg is None else jax.device_put(seg, sh))
        flat1 = dict(jax.tree_util.tree_flatten_with_path(g1)[0])
        out.append(dict(
            packed=seg is not None, logits=maxrel(logits2, logits1),
            grads={jax.tree_util.keystr(k): maxrel(g, flat1[k])
                   for k, g in jax.tree_util.tree_flatten_with_path(g2)[0]},
            logits_spec=[str(a) for a in logits2.sharding.spec],
            logits_shard=list(logits2.addressable_shards[0].data.shape)))
    return out


def train_case():
    """configs/tiny.py (gdn + swa, packed stdlib text) for 3 steps on one device and on
    meshes {context: 2, data: 2} and {context: 4}: the logged losses."""
    from configs.tiny import get_config
    from train import run

    import tempfile
    losses = {}
    for name, (data, context) in {"1": (1, 1), "d2c2": (2, 2), "c4": (1, 4)}.items():
        c = get_config()
        c.train.update(steps=3, eval_every=0, eval_batches=0, log_every=1, batch_size=4)
        c.checkpoint.enabled = False
        c.logging.tensorboard = False
        c.mesh.update(data=data, fsdp=1, tensor=1, context=context)
        with tempfile.TemporaryDirectory() as wd:
            run(c, wd)
            losses[name] = {json.loads(l)["step"]: json.loads(l)["loss"]
                            for l in open(Path(wd) / "metrics.jsonl") if "loss" in json.loads(l)}
    return losses


def worker(out):
    import jax
    assert jax.device_count() == 4, jax.devices()
    kind = Path(out).stem
    cases = {c["name"]: c for c in FAST + SLOW}
    result = train_case() if kind == "train" else {n: model_case(cases[n])
                                                   for n in kind.split("+")}
    Path(out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- pytest side
def _run(tmp_path, kind):
    out = tmp_path / f"{kind}.json"
    _sim.run_with_devices(__file__, out, devices=4)
    return json.loads(out.read_text())


def _check_model(result):
    for name, runs in result.items():
        for r in runs:
            where = (name, "packed" if r["packed"] else "plain")
            assert r["logits"] <= TOL, where
            bad = {k: v for k, v in r["grads"].items() if not v <= TOL}
            assert not bad, (where, bad)
            # The logits stay split over T (never gathered onto a device).
            assert "context" in r["logits_spec"][1], (where, r["logits_spec"])


def test_model_matches_one_device(tmp_path):
    _check_model(_run(tmp_path, "+".join(c["name"] for c in FAST)))


@pytest.mark.slow
def test_more_mixers_and_meshes_match_one_device(tmp_path):
    _check_model(_run(tmp_path, "+".join(c["name"] for c in SLOW)))


@pytest.mark.slow
def test_training_logs_the_one_device_losses(tmp_path):
    losses = _run(tmp_path, "train")
    ref = losses.pop("1")
    assert sorted(ref) == ["1", "2", "3"]
    for mesh, got in losses.items():
        assert sorted(got) == sorted(ref), mesh
        for step, loss in got.items():
            assert loss == pytest.approx(ref[step], rel=TOL), (mesh, step)


# --------------------------------------------------------------------------- config errors
def _config(pattern=("gdn", "swa"), context=4, **model):
    from configs import base
    c = base.get_config()
    c.model = base.model_config(d_model=32, num_layers=len(pattern), num_heads=2,
                                pattern=pattern, **model)
    c.train.update(seq_len=32, batch_size=4)
    c.mesh.update(data=1, fsdp=1, tensor=1, context=context)
    return c


@pytest.mark.parametrize("model, edit, message", [
    ({}, None, None),
    (dict(pattern=("gdn", "mom")), None,
     "config.model.mixers.mom: does not support mesh.context > 1"),
    (dict(pattern=("nsa",)), None, "config.model.mixers.nsa: does not support mesh.context > 1"),
    (dict(pattern=("attn",), mixers={"attn": {"topk_blocks": 2}}), None,
     "config.model.mixers.attn: does not support mesh.context > 1 (top-k block attention"),
    (dict(pattern=("attn",), segments={"kind": "rmt", "length": 8}), None,
     "config.model.segments: does not support mesh.context > 1"),
    ({}, lambda c: c.train.update(seq_len=30),
     "config.train.seq_len: 30 is not divisible by mesh.context = 4"),
    ({}, lambda c: c.rules.update(length=""),
     "config.rules.length: must be 'context' when mesh.context = 4 > 1"),
    ({}, lambda c: c.rules.update(batch="data,context"),
     "config.rules.batch: 'context' is the sequence axis"),
    ({}, lambda c: c.mesh.update(context=16), "config.mesh: shape (data, fsdp, tensor, context)"),
])
def test_config_errors(model, edit, message):
    from train.config import ConfigError, resolve

    c = _config(**model)
    if edit is not None:
        edit(c)
    if message is None:
        r = resolve(c, num_devices=8)
        assert (r.mesh.data, r.mesh.fsdp, r.mesh.tensor, r.mesh.context) == (1, 1, 1, 4)
        return
    with pytest.raises(ConfigError) as e:
        resolve(c, num_devices=8)
    assert str(e.value).startswith(message), str(e.value)


def test_context_one_is_the_plain_model():
    """Without a mesh, or with mesh.context = 1, no layer takes the context-parallel path."""
    import jax
    from layers.common import context_size
    from train.sharding import make_mesh

    assert context_size() == 1
    with jax.set_mesh(make_mesh((1, 1, 1))):
        assert context_size(32) == 1


if __name__ == "__main__":
    worker(sys.argv[1])
