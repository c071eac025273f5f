"""mem_lm.convert against fla's RetNetForCausalLM and LinearAttentionForCausalLM: the fixtures
tests/fixtures/fla/{retnet, vanilla_la} (made by tests/fixtures/make_fla_fixtures.py --only
retnet,vanilla_la with fla 0.6.0's own modelling code on the CPU) hold tiny random checkpoints
and fla's logits for fixed prompts. No torch here."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from mem_lm import LanguageModel, ModelConfig
from mem_lm.convert import ConversionError, config_from_fla, config_to_fla, export_fla, import_fla

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "fla")


@pytest.mark.parametrize("kind, mixer", [("retnet", "retnet"), ("vanilla_la", "la")])
def test_logits_match_fla_and_export_is_exact(kind, mixer, tmp_path):
    path = os.path.join(FIXTURES, kind)
    e = np.load(os.path.join(path, "expected.npz"))
    cfg, params = import_fla(path)
    assert set(cfg.layer_mixers) == {mixer}
    cfg = dataclasses.replace(cfg, impl="reference")
    logits = jax.jit(LanguageModel(cfg).apply)({"params": params},
                                               jnp.asarray(e["tokens"], jnp.int32))
    err = float(np.max(np.abs(np.asarray(logits) - e["logits"])))
    assert err < 1e-4, f"max |logit diff| vs fla = {err:.2e}"

    export_fla(cfg, params, str(tmp_path))
    original = load_file(os.path.join(path, "model.safetensors"))
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, w in original.items():
        assert exported[name].tobytes() == w.tobytes(), name
    cfg2, _ = import_fla(str(tmp_path))
    assert dataclasses.replace(cfg2, impl=cfg.impl) == cfg


def test_fla_config_fields_and_refusals():
    with open(os.path.join(FIXTURES, "retnet", "config.json")) as f:
        retnet = json.load(f)
    cfg = config_from_fla(retnet)
    # fla's expand_k / expand_v are of hidden_size; ours is value width per key width.
    assert (cfg.resolved_head_dim, cfg.settings("retnet")["expand_v"]) == (8, 2.0)
    with pytest.raises(ConversionError, match="use_output_gate"):
        config_from_fla(dict(retnet, use_output_gate=False))
    with pytest.raises(ConversionError, match="feature_map"):
        config_from_fla(dict(model_type="linear_attn", feature_map="hedgehog"))
    with pytest.raises(ConversionError, match="expand_v"):
        config_from_fla(dict(model_type="linear_attn", feature_map="elu", expand_v=2.0))
    base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, head_dim=8)
    with pytest.raises(ConversionError, match="short convs"):
        config_to_fla(ModelConfig(pattern=("retnet",),
                                  mixers={"retnet": {"short_conv": True}}, **base))
    with pytest.raises(ConversionError, match="taylor"):
        config_to_fla(ModelConfig(pattern=("la",), mixers={"la": {"feature_map": "taylor"}},
                                  **base))
