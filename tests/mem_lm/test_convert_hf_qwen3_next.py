"""mem_lm.convert --from/--to hf for Qwen3NextForCausalLM against transformers' own modelling
code: the fixtures (tests/fixtures/hf/qwen3_next*, made by
tests/fixtures/make_hf_qwen3_next_fixtures.py with torch 2.13 + transformers 5.24 on the CPU,
their torch fallbacks) hold tiny random checkpoints as save_pretrained writes them (per-expert
tensors, fused GDN projections), the logits transformers computed and its greedy continuation.
No torch here."""
import dataclasses
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_parity import check_greedy_generation, check_import_and_export, fixture, hf_config
from mem_lm.convert import ConversionError, config_from_hf, config_to_hf, import_hf
from mem_lm.convert.common import SafetensorsDir
from mem_lm.convert.hf import qwen3_next_layers, read_hf





# qwen3_next: gdn / attn alternating, a dense MLP in layer 0 then MoE, partial RoPE on half of
# each head, θ 1e7. qwen3_next_3to1: the release's 3:1 layout, MoE everywhere, routing weights
# not renormalised, RoPE on a quarter of each head, tied embeddings (under -m slow: ~6 s each
# here, mostly compiling).
@pytest.mark.parametrize("kind, pattern, channels", [
    ("qwen3_next", ("gdn", "attn"), ("swiglu", "moe", "moe", "moe")),
    pytest.param("qwen3_next_3to1", ("gdn", "gdn", "gdn", "attn"), ("moe",),
                 marks=pytest.mark.slow)])
def test_logits_match_transformers_and_export_is_exact(kind, pattern, channels, tmp_path):
    ours, theirs = check_import_and_export(kind, pattern, channels, tmp_path)
    # The exported config.json describes the same transformers model as the original.
    assert qwen3_next_layers({**theirs, "full_attention_interval": 4}) == \
        qwen3_next_layers({**ours, "layer_types": ours["layer_types"]})


@pytest.mark.slow
def test_greedy_generation_matches_transformers():
    """8 greedy tokens after a 12-token prompt: transformers decodes with its cache (the
    recurrent GDN step, the KV cache), mem_lm.generate with ours."""
    check_greedy_generation("qwen3_next")


def test_config_fields():
    cfg = config_from_hf(hf_config("qwen3_next"))
    assert (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers) == (16, 2, 8, 4)
    assert cfg.zero_centred_norms and cfg.norm_eps == 1e-6 and not cfg.tie_embeddings
    assert cfg.settings("gdn") == dict(num_v_heads=4, expand_v=0.5, use_gate=True,
                                       allow_neg_eigval=False, short_conv=True, conv_size=4)
    attn = cfg.settings("attn")
    assert {k: attn[k] for k in ("heads", "head_size", "num_kv_heads", "rope_base",
                                 "rope_fraction", "output_gate", "qk_norm")} == \
        dict(heads=2, head_size=8, num_kv_heads=1, rope_base=1e7, rope_fraction=0.5,
             output_gate=True, qk_norm=True)
    moe = cfg.settings("moe")
    assert {k: moe[k] for k in ("num_experts", "top_k", "d_expert", "d_shared", "shared_gate",
                                "router", "norm_topk_prob")} == \
        dict(num_experts=4, top_k=2, d_expert=8, d_shared=6, shared_gate=True,
             router="softmax", norm_topk_prob=True)
    assert cfg.settings("swiglu")["d_ff"] == 12


def test_layer_kinds_follow_transformers_rules():
    """full_attention_interval without layer_types; MoE every decoder_sparse_step-th layer
    except mlp_only_layers (Qwen3NextDecoderLayer)."""
    c = dict(hf_config("qwen3_next"), num_hidden_layers=8, layer_types=None,
             full_attention_interval=4, decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = config_from_hf(c)
    assert cfg.pattern == ("gdn", "gdn", "gdn", "attn")
    assert [cfg.layer_kinds(i)[1] for i in range(8)] == \
        ["swiglu", "moe", "swiglu", "swiglu", "swiglu", "moe", "swiglu", "moe"]


@pytest.mark.parametrize("field, value, named", [
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
     "rope_parameters"),
    ("layer_types", ["linear_attention", "sliding_attention"] * 2, "layer_types"),
    ("num_nextn_predict_layers", 1, "num_nextn_predict_layers"),   # not a transformers field
    ("linear_num_value_heads", 3, "num_v_heads"),
])
def test_unsupported_configs_are_named(field, value, named):
    with pytest.raises(ConversionError, match=named):
        config_from_hf({**hf_config("qwen3_next"), field: value})


def test_checkpoint_errors_name_the_tensors(tmp_path):
    src, _ = fixture("qwen3_next")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    broken = {n: w for n, w in tensors.items() if n != "model.layers.2.mlp.experts.3.up_proj.weight"}
    broken["mtp.fc.weight"] = tensors["lm_head.weight"]          # dropped: the release's MTP head
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing tensors: \['model\.layers\.2\.mlp\.experts"
                                              r"\.3\.up_proj\.weight'\]$"):
        import_hf(str(tmp_path))


def test_export_refuses_what_qwen3_next_cannot_express():
    cfg = config_from_hf(hf_config("qwen3_next"))
    with pytest.raises(ConversionError, match="zero_centred_norms"):
        config_to_hf(dataclasses.replace(cfg, zero_centred_norms=False))
    mixers = {**dict((n, dict(s)) for n, s in cfg.mixers), "moe": {
        **cfg.settings("moe"), "router": "sigmoid"}}
    with pytest.raises(ConversionError, match="moe router = 'sigmoid'"):
        config_to_hf(dataclasses.replace(cfg, mixers=mixers))
    with pytest.raises(ConversionError, match="pattern"):
        config_to_hf(dataclasses.replace(cfg, pattern=("gdn", "swa"),
                                         mixers={**mixers, "swa": {}}))


def test_checkpoint_tensors_are_read_one_at_a_time():
    """read_hf gives a lazy view of the safetensors files (each tensor read when taken, so a
    checkpoint larger than host memory is never read whole), with the names and values of
    the files."""
    path, _ = fixture("qwen3_next")
    _, tensors = read_hf(path)
    whole = load_file(os.path.join(path, "model.safetensors"))
    assert isinstance(tensors, SafetensorsDir) and set(tensors) == set(whole)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    np.testing.assert_array_equal(tensors[name], whole[name])
    view = tensors.without(lambda n: ".experts." in n)
    assert name not in view and len(view) == len(whole) - 3 * 3 * 4
