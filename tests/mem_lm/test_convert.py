"""mem_lm.convert against fla's own modelling code: the fixtures (tests/fixtures/fla/, made by
tests/fixtures/make_fla_fixtures.py and make_fla_kda_fixtures.py with torch +
flash-linear-attention 0.6.0) hold tiny random fla checkpoints of each kind and the logits fla
computed for fixed prompts. No torch here."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mem_lm import LanguageModel, apply_with_aux, decode_step, load_pretrained, prefill
from mem_lm.convert import (ConversionError, config_from_fla, config_to_fla, export_fla,
                            fla_mlp_width, import_fla, main)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "fla")
KINDS = ("gdn", "gdn_nogate", "gdn_gva", "gdn_negeig", "deltanet", "gla", "gdn_attn", "mom",
         "mom_noshared", "nsa", "kda", "kda_gva")
TOL = 1e-4


def fixture(kind):
    path = os.path.join(FIXTURES, kind)
    e = np.load(os.path.join(path, "expected.npz"))
    return path, jnp.asarray(e["tokens"], jnp.int32), e["logits"]


def fla_config(kind):
    with open(os.path.join(FIXTURES, kind, "config.json")) as f:
        return json.load(f)


def _close(ours, theirs):
    err = float(np.max(np.abs(np.asarray(ours) - theirs)))
    assert err < TOL, f"max |logit diff| vs fla = {err:.2e}"


# The chunked ops' parity with the token-scan reference is the ops' own tests; here the
# reference impl keeps compile time down, and `gdn` runs the default impl. A fixture that
# records fla's load-balance loss (MoM: fla's load_balancing_loss_func of the same forward,
# unscaled) checks ours against it × aux_loss_scale, from the same program.
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_fla_and_export_is_exact(kind, tmp_path):
    path, tokens, expected = fixture(kind)
    cfg, params = import_fla(path)
    if kind != "gdn":
        cfg = dataclasses.replace(cfg, impl="reference")
    logits, aux = jax.jit(lambda p, t: apply_with_aux(LanguageModel(cfg), {"params": p}, t))(
        params, tokens)
    _close(logits, expected)
    recorded = np.load(os.path.join(path, "expected.npz"))
    if "aux_loss" in recorded:
        scale = fla_config(kind)["aux_loss_scale"]
        assert cfg.settings("mom")["aux_loss_weight"] == scale
        np.testing.assert_allclose(aux["losses"]["mom_load_balance"],
                                   scale * recorded["aux_loss"], rtol=1e-5)

    export_fla(cfg, params, str(tmp_path))
    original, exported = load_file(os.path.join(path, "model.safetensors")), \
        load_file(str(tmp_path / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, w in original.items():
        assert exported[name].shape == w.shape and exported[name].tobytes() == w.tobytes(), name
    cfg2, params2 = import_fla(str(tmp_path))
    assert dataclasses.replace(cfg2, impl=cfg.impl) == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params2, params)


def test_expected_fla_config_fields():
    cfg = config_from_fla(fla_config("gdn_gva"))
    assert (cfg.num_heads, cfg.resolved_head_dim, cfg.settings("gdn")["num_v_heads"]) == (2, 8, 4)
    cfg = config_from_fla(fla_config("gdn_attn"))
    assert cfg.pattern == ("gdn", "swa", "attn")
    assert {k: cfg.settings("attn")[k] for k in ("heads", "num_kv_heads", "head_size")} == \
        dict(heads=2, num_kv_heads=2, head_size=16)
    assert {k: cfg.settings("swa")[k] for k in ("heads", "num_kv_heads", "head_size",
                                                  "window", "qkv_bias", "rope_base")} == \
        dict(heads=4, num_kv_heads=2, head_size=8, window=6, qkv_bias=True, rope_base=5000.0)
    assert config_from_fla(fla_config("gdn_nogate")).tie_embeddings
    gla = config_from_fla(fla_config("gla"))
    assert (gla.resolved_head_dim, gla.settings("gla")["expand_v"]) == (8, 2.0)
    kda = config_from_fla(fla_config("kda"))
    assert kda.pattern == ("kda",) and kda.settings("kda")["expand_v"] == 2.0
    kda = config_from_fla(fla_config("kda_gva"))
    assert {k: kda.settings("kda")[k] for k in ("num_v_heads", "lower_bound", "allow_neg_eigval",
                                                 "short_conv")} == \
        dict(num_v_heads=4, lower_bound=-5.0, allow_neg_eigval=True, short_conv=False)
    assert config_to_fla(kda)["safe_gate"] is True    # fla's fast kernel for bounded gates


def test_mlp_width_rule_matches_fla():
    with open(os.path.join(FIXTURES, "mlp_widths.json")) as f:
        cases = json.load(f)
    for c in cases:
        assert fla_mlp_width(c["hidden_size"], c["hidden_ratio"], c["intermediate_size"]) \
            == c["width"], c


@pytest.mark.parametrize("kind", ["gdn_attn", "kda", "kda_gva"])
def test_decoding_continues_like_fla(kind):
    """Prefill 8 tokens, then decode the rest one at a time: every step's logits are fla's
    (the hybrid: GDN with grouped value heads; sliding-window attention with its own heads,
    biases and RoPE base; full attention with its own head width. KDA: per-key decays in the
    state and the conv caches; with grouped value heads and fla's bounded gate)."""
    path, tokens, expected = fixture(kind)
    cfg, params = import_fla(path)
    model, variables = LanguageModel(dataclasses.replace(cfg, impl="reference")), \
        {"params": params}
    T0, T = 8, tokens.shape[1]
    logits, cache = prefill(model, variables, tokens[:, :T0], T)
    _close(logits, expected[:, T0 - 1])
    for t in range(T0, T):
        logits, cache = decode_step(model, variables, tokens[:, t], cache)
        _close(logits, expected[:, t])


def test_packed_documents_match_fla():
    """fla's two prompts packed into one row with segment ids: each keeps fla's logits."""
    path, tokens, expected = fixture("gdn_attn")
    cfg, params = import_fla(path)
    model = LanguageModel(dataclasses.replace(cfg, impl="reference"))
    B, T = tokens.shape
    seg = jnp.repeat(jnp.arange(1, B + 1, dtype=jnp.int32), T)[None]
    packed = jax.jit(model.apply)({"params": params}, tokens.reshape(1, B * T), segment_ids=seg)
    _close(packed.reshape(B, T, -1), expected)


def _copy(kind, tmp_path):
    d = tmp_path / kind
    shutil.copytree(os.path.join(FIXTURES, kind), d)
    return d


def test_bfloat16_sharded_and_unfused_checkpoints(tmp_path):
    """What else save_pretrained writes: bfloat16 tensors, shards with an index, and GLA
    saved with fuse_norm=False (its output norm is then named g_norm)."""
    import ml_dtypes
    src = os.path.join(FIXTURES, "gla")
    cfg, params = import_fla(src)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    d = tmp_path / "gla"
    d.mkdir()
    c = dict(fla_config("gla"), fuse_norm=False)
    (d / "config.json").write_text(json.dumps(c))
    tensors = {n.replace("g_norm_swish_gate", "g_norm"): w.astype(ml_dtypes.bfloat16)
               for n, w in tensors.items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}
    for f, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    cfg2, params2 = import_fla(str(d))
    assert cfg2 == cfg
    bf16 = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, bf16(b)), params2, params)


def test_unknown_config_field_is_named(tmp_path):
    d = _copy("gdn", tmp_path)
    c = fla_config("gdn")
    c["qk_norm_type"] = "layer"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConversionError, match=r"unsupported field\(s\) \['qk_norm_type'\]"):
        import_fla(str(d))


@pytest.mark.parametrize("kind, field, value", [
    ("gdn", "output_gate_activation", "sigmoid"),
    ("deltanet", "qk_activation", "relu"),
    ("gla", "feature_map", "relu"),
    ("gla", "num_kv_heads", 1),
    ("gdn", "attnres_block_size", 2),
    ("gdn", "model_type", "rwkv7"),
    ("mom", "single_kv_proj", True),
    ("mom", "attn", {"layers": [1], "num_heads": 2}),
    ("nsa", "qkv_bias", True),
])
def test_unsupported_values_are_named(kind, field, value):
    c = fla_config(kind)
    c[field] = value
    with pytest.raises(ConversionError, match=field):
        config_from_fla(c)


def test_leftover_and_missing_tensors_are_listed(tmp_path):
    d = _copy("gdn", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.attn.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    del tensors["model.layers.1.attn.dt_bias"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        import_fla(str(d))
    assert "missing tensors: ['model.layers.1.attn.dt_bias']" in str(e.value)
    assert "left over (not mapped to any parameter): ['model.layers.0.attn.extra_proj.weight']" \
        in str(e.value)


def test_tied_head_copy(tmp_path):
    """A tied model saved with its lm_head copy imports when the copy is the embedding."""
    d = _copy("gdn_nogate", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embeddings.weight"].copy()
    save_file(tensors, str(d / "model.safetensors"))
    _, params = import_fla(str(d))
    assert "lm_head" not in params
    tensors["lm_head.weight"][0, 0] += 1
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        import_fla(str(d))


def test_wrong_shape_is_named(tmp_path):
    d = _copy("gdn", tmp_path)
    c = fla_config("gdn")
    c["expand_v"] = 1.0     # the tensors were saved with expand_v = 2
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConversionError, match=r"model.layers.0.attn.v_proj.weight: shape"):
        import_fla(str(d))


def test_export_refuses_what_fla_cannot_express(tmp_path):
    cfg, params = import_fla(os.path.join(FIXTURES, "gdn_attn"))
    bad = dataclasses.replace(cfg, mixers={**dict(cfg.mixers), "swa": {
        **cfg.settings("swa"), "sinks": True}})
    with pytest.raises(ConversionError, match="sinks"):
        export_fla(bad, params, str(tmp_path))
    with pytest.raises(ConversionError, match="exactly one of"):
        export_fla(dataclasses.replace(cfg, pattern=("gdn", "swa", "gla")), params, str(tmp_path))


def test_mom_export_needs_flas_q_conv_and_no_capacity():
    cfg = config_from_fla(fla_config("mom"))
    for field, value, message in (("q_conv_per_memory", False, "q_conv_per_memory"),
                                  ("capacity_factor", 1.0, "drops no tokens")):
        bad = dataclasses.replace(cfg, mixers={**dict(cfg.mixers), "mom": {
            **cfg.settings("mom"), field: value}})
        with pytest.raises(ConversionError, match=message):
            config_to_fla(bad)


def test_nsa_imports_as_flas_variant_and_only_that_exports():
    """fla's NSAForCausalLM (tests/fixtures/make_fla_nsa_fixtures.py; its logits are checked
    with the other kinds) is our nsa with fla's settings; the paper's nsa has no fla form."""
    cfg = config_from_fla(fla_config("nsa"))
    assert {k: cfg.settings("nsa")[k] for k in (
        "selection", "compress", "shared_kv", "cmp_block", "cmp_stride", "sel_block",
        "sel_blocks", "window", "num_kv_heads", "rope_base")} == dict(
        selection="token", compress="mean", shared_kv=True, cmp_block=4, cmp_stride=4,
        sel_block=4, sel_blocks=4, window=6, num_kv_heads=1, rope_base=5000.0)
    paper = dataclasses.replace(cfg, mixers={**dict(cfg.mixers), "nsa": {
        **cfg.settings("nsa"), "compress": "linear", "shared_kv": False}})
    with pytest.raises(ConversionError, match="fla's NSA is"):
        config_to_fla(paper)


def test_export_of_scan_layers_params(tmp_path):
    """A model trained with scan_layers (params stacked over groups) exports the same file."""
    import flax.linen as nn
    path = os.path.join(FIXTURES, "gdn")
    cfg, params = import_fla(path)
    scfg = dataclasses.replace(cfg, scan_layers=True)
    assert scfg.num_groups == 2
    layers = [params.pop(f"layer_{i}") for i in range(cfg.num_layers)]
    params["groups"] = {"block_0": jax.tree.map(lambda *a: np.stack(a), *layers)}
    shapes = jax.eval_shape(LanguageModel(scfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]
    assert jax.tree.structure(nn.meta.unbox(shapes)) == jax.tree.structure(params)
    export_fla(scfg, params, str(tmp_path))
    a, b = load_file(os.path.join(path, "model.safetensors")), \
        load_file(str(tmp_path / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_cli_round_trip_through_a_workdir(tmp_path, capsys):
    """--from fla writes a workdir load_pretrained reads; --to fla gives back the same file."""
    src = os.path.join(FIXTURES, "gdn_nogate")
    assert main(["--from", "fla", src, "--out", str(tmp_path / "run")]) == 0
    model, variables = load_pretrained(str(tmp_path / "run"))
    cfg, params = import_fla(src)
    assert model.config == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 variables["params"], params)
    assert main(["--to", "fla", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    a, b = load_file(os.path.join(src, "model.safetensors")), \
        load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert main(["--from", "fla", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "no config.json" in capsys.readouterr().err



def test_training_continues_from_an_import(tmp_path):
    """The experiment config the import writes trains from the imported parameters (at a
    learning rate too small to move them), and train.init_from refuses another model."""
    import importlib.util

    from train.config import ConfigError, resolve
    from train.loop import run
    src = os.path.join(FIXTURES, "gla")
    assert main(["--from", "fla", src, "--out", str(tmp_path / "imported")]) == 0
    spec = importlib.util.spec_from_file_location("imported_config",
                                                  tmp_path / "imported" / "train_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.update(source="mqar", vocab_size=64, num_kv_pairs=2)    # the fixture's vocabulary
    c.model.impl = "reference"    # how the model runs, not what it is: compiles faster
    c.train.update(steps=1, batch_size=2, seq_len=16, eval_every=0, eval_batches=0)
    c.optim.update(learning_rate=1e-30, warmup_steps=0)
    c.logging.update(tensorboard=False, progress_bar=False)
    c.checkpoint.enabled = False
    state = run(c, str(tmp_path / "continued"), return_state=True)["state"]
    _, params = import_fla(src)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6),
                 state["params"], params)
    c.model.num_layers = 1
    with pytest.raises(ConfigError, match=r"train.init_from: .* holds another model than "
                                          r"config.model:\n  model.num_layers: 1 here, 2 there"):
        resolve(c)

# fla's GatedDeltaNet at d_model 1024 (its 0.75 · d_model rule for q/k: 3 heads of 256).
BIG = dict(model_type="gated_deltanet", hidden_size=1024, num_hidden_layers=12, head_dim=256,
           num_heads=3, expand_v=2.0, vocab_size=32000, hidden_ratio=4, intermediate_size=None)


@pytest.mark.slow
def test_import_runs_at_real_size(tmp_path):
    """A 12-layer d_model-1024 Gated DeltaNet (245M parameters) in fla's format: imported and
    run. MEMLM_FLA_BIG=DIR takes one that fla saved (tests/fixtures/make_fla_fixtures.py --big
    DIR); otherwise random weights are written in fla's format here. Prints the times."""
    import time

    from mem_lm.convert import config_from_fla, param_shapes, tensor_map
    path = os.environ.get("MEMLM_FLA_BIG")
    if path is None:
        path = str(tmp_path)
        cfg = config_from_fla(BIG)
        rng = np.random.default_rng(0)
        shapes = param_shapes(cfg)
        params = {}
        for _, p, _ in tensor_map(cfg):
            node = params
            for k in p[:-1]:
                node = node.setdefault(k, {})
            node[p[-1]] = (rng.standard_normal(shapes[p], np.float32) * 0.02)
        export_fla(cfg, params, path)
    t0 = time.perf_counter()
    cfg, params = import_fla(path)
    t_import = time.perf_counter() - t0
    assert cfg.num_layers == 12 and cfg.d_model == 1024 and cfg.settings("swiglu")["d_ff"] == 2816
    model = LanguageModel(cfg)
    fwd = jax.jit(model.apply)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32000, (1, 512)), jnp.int32)
    params = jax.device_put(params)
    t0 = time.perf_counter()
    logits = fwd({"params": params}, tokens).block_until_ready()
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fwd({"params": params}, tokens).block_until_ready()
    t_fwd = time.perf_counter() - t0
    assert logits.shape == (1, 512, 32000) and bool(jnp.all(jnp.isfinite(logits)))
    print(f"\nfla d1024 x 12 layers: import {t_import:.1f} s, first forward (compile + run) "
          f"{t_first:.1f} s, forward of 1 x 512 tokens {t_fwd:.2f} s")
