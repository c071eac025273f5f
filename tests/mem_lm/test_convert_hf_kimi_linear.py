"""mem_lm.convert --from/--to hf for KimiLinearForCausalLM against transformers' own modelling
code: the fixtures (tests/fixtures/hf/kimi_linear*, made by
tests/fixtures/make_hf_kimi_linear_fixtures.py with torch 2.13 + transformers 5.24 on the CPU,
their torch fallbacks) hold tiny random checkpoints as save_pretrained writes them (the
release's layout: per-expert w1/w2/w3, q/k/v convs apart), the logits transformers computed
and its greedy continuation. No torch here."""
import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_parity import check_greedy_generation, check_import_and_export, fixture, hf_config
from mem_lm.convert import ConversionError, config_from_hf, config_to_hf, import_hf
from mem_lm.model import param_count


# The release's config.json (moonshotai/Kimi-Linear-48B-A3B-Instruct), every field.
RELEASE = dict(
    architectures=["KimiLinearForCausalLM"], model_type="kimi_linear", vocab_size=163840,
    hidden_size=2304, head_dim=72, intermediate_size=9216, num_hidden_layers=27,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", rms_norm_eps=1e-5,
    rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, first_k_dense_replace=1,
    moe_intermediate_size=1024, moe_layer_freq=1, moe_renormalize=True,
    moe_router_activation_func="sigmoid", num_experts=256, num_experts_per_token=8,
    num_shared_experts=1, routed_scaling_factor=2.446, use_grouped_topk=True,
    num_expert_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, mla_use_nope=True, num_nextn_predict_layers=0,
    linear_attn_config=dict(full_attn_layers=[4, 8, 12, 16, 20, 24, 27], head_dim=128,
                            kda_layers=[i for i in range(1, 28)
                                        if i not in (4, 8, 12, 16, 20, 24, 27)],
                            num_heads=32, short_conv_kernel_size=4),
    model_max_length=1048576, bos_token_id=163584, eos_token_id=163586, pad_token_id=163839,
    initializer_range=0.02, torch_dtype="bfloat16", transformers_version="4.56.0",
    use_cache=True, auto_map={"AutoConfig": "configuration_kimi.KimiLinearConfig",
                              "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"})




# kimi_linear: KDA, KDA, MLA, KDA; a dense MLP in layer 0 then MoE (2 shared experts, 2 groups).
# kimi_linear_moe_all: MLA first with a low-rank query, MoE everywhere, weights not
# renormalised (under -m slow).
@pytest.mark.parametrize("kind, pattern, channels", [
    ("kimi_linear", ("kda", "kda", "mla", "kda"), ("swiglu", "moe", "moe", "moe")),
    pytest.param("kimi_linear_moe_all", ("mla", "kda", "kda"), ("moe",),
                 marks=pytest.mark.slow)])
def test_logits_match_transformers_and_export_is_exact(kind, pattern, channels, tmp_path):
    ours, theirs = check_import_and_export(kind, pattern, channels, tmp_path)
    # The exported config.json describes the same transformers model as the original.
    for field in ("layer_types", "mlp_layer_types"):
        assert ours[field] == theirs[field], field


@pytest.mark.slow
def test_greedy_generation_matches_transformers():
    """8 greedy tokens after a 12-token prompt: transformers decodes with its cache (the
    recurrent KDA step, MLA's latent cache), mem_lm.generate with ours."""
    check_greedy_generation("kimi_linear")


def test_release_config_maps_every_field():
    """The 48B release's config.json: 3 KDA : 1 MLA with MLA last, a dense first layer, MoE
    with 256 experts, 8 chosen, one shared."""
    cfg = config_from_hf(RELEASE)
    assert cfg.layer_mixers.count("mla") == 7 and cfg.layer_mixers[3] == "mla"
    assert cfg.layer_mixers[-1] == "mla" and cfg.layer_kinds(0)[1] == "swiglu"
    assert (cfg.num_heads, cfg.resolved_head_dim, cfg.d_model) == (32, 128, 2304)
    moe = cfg.settings("moe")
    assert {k: moe[k] for k in ("num_experts", "top_k", "d_expert", "d_shared", "router",
                                "score_correction_bias", "routed_scaling_factor")} == \
        dict(num_experts=256, top_k=8, d_expert=1024, d_shared=1024, router="sigmoid",
             score_correction_bias=True, routed_scaling_factor=2.446)
    mla = cfg.settings("mla")
    assert (mla["kv_lora_rank"], mla["qk_rope_head_dim"], mla["rope"]) == (512, 64, False)
    assert not cfg.settings("kda")["gate_bias"]


@pytest.mark.slow
def test_release_parameter_count():
    """49,122,681,728 parameters (the README's memory table; ~5 s of tracing the 48B model)."""
    assert param_count(config_from_hf(RELEASE)) == 49_122_681_728


@pytest.mark.parametrize("field, value, named", [
    ("mla_use_nope", False, "mla_use_nope"),
    ("moe_router_activation_func", "softmax", "moe_router_activation_func"),
    ("moe_layer_freq", 2, "moe_layer_freq"),
    ("num_nextn_predict_layers", 1, "num_nextn_predict_layers"),
    ("num_key_value_heads", 1, "num_key_value_heads"),
    ("hidden_act", "gelu", "hidden_act"),
    ("linear_attn_config", {**RELEASE["linear_attn_config"], "gate_lower_bound": -5.0},
     "gate_lower_bound"),
    ("n_group", 4, "num_expert_group"),            # an alias that contradicts its field
    ("mla_use_output_gate", True, "mla_use_output_gate"),     # not a transformers field
])
def test_unsupported_configs_are_named(field, value, named):
    with pytest.raises(ConversionError, match=named):
        config_from_hf({**RELEASE, field: value})


def test_release_names_of_dense_mlps_are_read(tmp_path):
    """The release names its dense MLPs mlp.*, save_pretrained block_sparse_moe.*: both load;
    a missing expert tensor is named."""
    src, _ = fixture("kimi_linear")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    renamed = {n.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): w
               for n, w in tensors.items()}
    save_file(renamed, str(tmp_path / "model.safetensors"))
    _, a = import_hf(str(tmp_path))
    _, b = import_hf(src)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    del renamed["model.layers.2.block_sparse_moe.experts.5.w3.weight"]
    save_file(renamed, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"experts\.5\.w3"):
        import_hf(str(tmp_path))


def test_export_refuses_what_kimi_linear_cannot_express():
    cfg = config_from_hf(hf_config("kimi_linear"))
    mixers = {n: dict(s) for n, s in cfg.mixers}
    for mixer, field, value in (("kda", "gate_bias", True), ("mla", "rope", True),
                                ("moe", "shared_gate", True), ("moe", "d_shared", 7)):
        bad = {**mixers, mixer: {**mixers[mixer], field: value}}
        with pytest.raises(ConversionError, match=f"{mixer} {field}"):
            config_to_hf(dataclasses.replace(cfg, mixers=bad))
    with pytest.raises(ConversionError, match="zero_centred_norms"):
        config_to_hf(dataclasses.replace(cfg, zero_centred_norms=True))
