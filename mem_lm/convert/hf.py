"""Checkpoints of Hugging Face transformers' own models (a directory with `config.json` and
`model.safetensors`, or shards listed in `model.safetensors.index.json`, as
`save_pretrained` writes them):

    cfg, params = import_hf("path/to/model")        # ModelConfig, plain nested dict (float32)
    export_hf(cfg, params, "path/to/out")            # config.json + model.safetensors

    python -m mem_lm.convert --from hf PATH --out WORKDIR
    python -m mem_lm.convert --to hf WORKDIR --out PATH

Kinds (`model_type`): mamba2 (`Mamba2ForCausalLM`) -> `ssd` in every layer with no MLP
(`channel_pattern=("none",)`), the widths of layers/ssd.py set from the config: num_heads and
head_dim (their product is expand · hidden_size), state_size -> d_state, n_groups -> ngroups,
conv_kernel -> conv_size, layer_norm_epsilon -> norm_eps (the block, final and gated norms).

Every field of config.json is mapped, known to leave the forward unchanged (_NO_EFFECT), or an
error naming it; every tensor is mapped or the import fails listing what is left over or
missing. Mamba2's fused tensors are split by rows: in_proj.weight [z | x | B | C | dt] into
z_proj, x_proj, B_proj, C_proj, dt_proj, and conv1d's channels [x | B | C] into the three convs
and their biases (zeros when use_conv_bias is false; export always writes them, with
use_conv_bias true).

qwen3_next (`Qwen3NextForCausalLM`) -> layer_types (or full_attention_interval) as `pattern`:
linear_attention -> `gdn` (the model's num_heads / head_dim are linear_num_key_heads /
linear_key_head_dim; num_v_heads, expand_v = value / key head width, its conv), full_attention
-> `attn` with its own heads, head_size, num_kv_heads, rope_base, rope_fraction
(partial_rotary_factor), output_gate and qk_norm; the MLPs as `channel_pattern`: `moe`
(softmax router, norm_topk_prob, the shared expert behind its sigmoid gate, aux_loss_weight =
router_aux_loss_coef) where Qwen3NextDecoderLayer puts its sparse block (decoder_sparse_step,
mlp_only_layers), `swiglu` (d_ff = intermediate_size) elsewhere; zero_centred_norms (its
RMSNorms scale by 1 + w: the stored w is our scale, unchanged). Tensors: in_proj_qkvz and
in_proj_ba are per key head [q | k | v | z] and [b | a]: row orders split them into our q, k,
v, g (z) and b, a projections (`_qwen3_next_gdn`); the experts are one tensor per expert and
projection, as save_pretrained and the releases store them (`Stacked` slices of our [E, ...]
kernels). The release's multi-token-prediction tensors (mtp.*) are dropped, as transformers
drops them. Export writes the same names, config.json with layer_types and mlp_only_layers.

kimi_linear (`KimiLinearForCausalLM`) -> layer_types (else linear_attn_config's 1-indexed
kda_layers / full_attn_layers) as `pattern`: linear_attention -> `kda` (linear_num_heads /
linear_head_dim as the model's num_heads / head_dim, no output-gate bias: gate_bias False),
full_attention -> `mla` without RoPE; mlp_layer_types (else first_k_dense_replace) as
`channel_pattern`: `swiglu`, `moe` (sigmoid router with e_score_correction_bias, groups,
routed_scaling_factor; num_shared_experts · moe_intermediate_size as d_shared, ungated). The
attribute-map aliases (num_local_experts, n_group, ...) read as the release's names. Tensors:
the release's layout as save_pretrained writes it (`_kimi_linear_tensors`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from mem_lm.config import ModelConfig
from mem_lm.model import make_mixer
from mem_lm.convert.common import (ConversionError, RenamedTensors, Stacked,
                                   params_from_tensors, read_hf_dir, shortest_period,
                                   tensors_from_params)

# Fields of transformers' config.json that do not change the function the model computes:
# bookkeeping, token ids, initialisation (initializer_range, rescale_prenorm_residual, the
# time_step_* init range, and time_step_rank, which Mamba2Mixer does not use), the scan's
# blocking (chunk_size), caching and output switches, and residual_in_fp32 (the residual's
# dtype: float32 here whenever the compute dtype is).
_NO_EFFECT = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
    "rescale_prenorm_residual", "time_step_rank", "time_step_min", "time_step_max",
    "time_step_floor", "chunk_size", "use_cache", "residual_in_fp32", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "tie_encoder_decoder",
    "is_encoder_decoder", "chunk_size_feed_forward", "problem_type", "tokenizer_class",
    "id2label", "label2id", "_name_or_path", "name_or_path",
    # Qwen3-Next: positions beyond max_position_embeddings are computed the same (default
    # RoPE), dropout is off at inference, output_router_logits only returns the logits.
    "max_position_embeddings", "attention_dropout", "output_router_logits",
}
# transformers 5.24's Mamba2Config defaults, for fields a config.json may omit.
_DEFAULTS = {
    "mamba2": dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096,
                   state_size=128, num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2,
                   conv_kernel=4, n_groups=8, use_bias=False, use_conv_bias=True,
                   hidden_act="silu", time_step_limit=(0.0, math.inf),
                   tie_word_embeddings=False),
}
_DEFAULTS["qwen3_next"] = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_parameters=None, attention_bias=False, head_dim=256,
    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=10,
    num_experts=512, norm_topk_prob=True, router_aux_loss_coef=0.001, mlp_only_layers=None,
    layer_types=None, full_attention_interval=4,
    # transformers' older configs keep RoPE's settings flat; rope_parameters holds them now.
    rope_theta=10000.0, partial_rotary_factor=0.25, rope_scaling=None)
# transformers 5.24's KimiLinearConfig defaults, and the fields only the release's config.json
# has (read by its own modelling code and vLLM; transformers ignores them), at the values
# transformers' model behaves as.
_DEFAULTS["kimi_linear"] = dict(
    vocab_size=163840, hidden_size=2304, intermediate_size=9216, moe_intermediate_size=1024,
    num_hidden_layers=27, num_attention_heads=32, num_key_value_heads=32, num_shared_experts=1,
    routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
    v_head_dim=128, qk_nope_head_dim=128, qk_head_dim=None, num_expert_group=1, topk_group=1,
    num_experts_per_token=8, moe_renormalize=True, hidden_act="silu", rms_norm_eps=1e-5,
    tie_word_embeddings=False, attention_bias=False, num_experts=256, mlp_layer_types=None,
    layer_types=None, linear_head_dim=128, linear_num_heads=32, linear_conv_kernel_dim=4,
    linear_attn_config=None, first_k_dense_replace=1,
    mla_use_nope=True, moe_router_activation_func="sigmoid", moe_layer_freq=1,
    use_grouped_topk=True, num_nextn_predict_layers=0)
# Per kind, fields that leave its forward unchanged. Kimi Linear has no RoPE anywhere (its MLA
# is NoPE; transformers deletes the rotary embedding), so RoPE's settings, head_dim (which
# KimiLinearConfig sets to qk_rope_head_dim for RoPE alone) and the context length do nothing;
# pretraining_tp is unused; auto_map points at the release's own code.
_NO_EFFECT_OF = {"kimi_linear": {"rope_theta", "rope_scaling", "rope_parameters", "head_dim",
                                 "model_max_length", "pretraining_tp", "auto_map"}}
_ARCHITECTURES = {"mamba2": "Mamba2ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
                  "kimi_linear": "KimiLinearForCausalLM"}
_DENSE, _DENSE2 = ("dense", 1), ("dense", 2)


def _float(v) -> float:
    """A config number: transformers 5 writes infinity as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, Mapping) else float(v)


# ------------------------------------------------------------------------------ config
def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of a transformers config.json (a dict)."""
    model_type = hf.get("model_type")
    if model_type not in _DEFAULTS:
        raise ConversionError(f"hf config: model_type {model_type!r} is not supported; "
                              f"supported: {sorted(_DEFAULTS)}")
    if model_type == "kimi_linear":
        hf = _kimi_linear_fields(hf)
    c = dict(_DEFAULTS[model_type])
    c.update(hf)
    unknown = sorted(set(hf) - set(_DEFAULTS[model_type]) - _NO_EFFECT
                     - _NO_EFFECT_OF.get(model_type, set()))
    if unknown:
        raise ConversionError(f"hf config ({model_type}): unsupported field(s) {unknown}; "
                              f"nothing is dropped silently, so remove them only if they do "
                              f"not change the model")

    def require(field, ok, allowed):
        if not ok:
            raise ConversionError(f"hf config ({model_type}): {field} = {c[field]!r} is not "
                                  f"supported (supported: {allowed})")

    require("hidden_act", c["hidden_act"] in ("silu", "swish"), "silu")
    try:
        return _CONFIG_FROM[model_type](c, require)
    except ConversionError:
        raise
    except ValueError as e:
        raise ConversionError(f"hf config ({model_type}): {e}") from None


def _mamba2_config(c: dict, require) -> ModelConfig:
    require("use_bias", not c["use_bias"], "false: in_proj and out_proj without biases")
    limit = tuple(_float(v) for v in c["time_step_limit"])
    require("time_step_limit", limit == (0.0, math.inf),
            "(0.0, inf): dt is not clamped (transformers' one-token path ignores the limit)")
    d, H, P = c["hidden_size"], c["num_heads"], c["head_dim"]
    if d * c["expand"] != H * P:
        raise ConversionError(f"hf config (mamba2): hidden_size · expand = "
                              f"{d * c['expand']} must equal num_heads · head_dim = {H * P}")
    ssd = dict(d_state=c["state_size"], ngroups=c["n_groups"], conv_size=c["conv_kernel"],
               short_conv=True)
    return ModelConfig(vocab_size=c["vocab_size"], d_model=d,
                       num_layers=c["num_hidden_layers"], num_heads=H, head_dim=P,
                       pattern=("ssd",), channel_pattern=("none",), mixers={"ssd": ssd},
                       tie_embeddings=bool(c["tie_word_embeddings"]),
                       norm_eps=float(c["layer_norm_epsilon"]))


# Qwen3-Next's layer types, our token mixers.
_QWEN3_NEXT_MIXERS = {"linear_attention": "gdn", "full_attention": "attn"}


def _rope(c: dict) -> dict:
    """RoPE's settings: rope_parameters (transformers 5), else the flat fields of older
    configs (rope_theta, partial_rotary_factor, rope_scaling)."""
    rope = dict(c["rope_parameters"] or {})
    rope.setdefault("rope_type", (c["rope_scaling"] or {}).get("rope_type", "default"))
    rope.setdefault("rope_theta", c["rope_theta"])
    rope.setdefault("partial_rotary_factor", c["partial_rotary_factor"])
    return rope


def qwen3_next_layers(c: Mapping[str, Any]) -> tuple[tuple, tuple]:
    """(token mixers, channel mixers), one per layer, of a Qwen3-Next config (defaults filled):
    layer_types (or every full_attention_interval-th layer full attention); the MoE block in
    layer i unless i is in mlp_only_layers, (i + 1) % decoder_sparse_step != 0 or there are no
    experts, as Qwen3NextDecoderLayer decides."""
    n = c["num_hidden_layers"]
    types = c["layer_types"] or [
        "linear_attention" if (i + 1) % c["full_attention_interval"] else "full_attention"
        for i in range(n)]
    if len(types) != n or set(types) - set(_QWEN3_NEXT_MIXERS):
        raise ConversionError(f"hf config (qwen3_next): layer_types must list {n} of "
                              f"{sorted(_QWEN3_NEXT_MIXERS)}, got {types}")
    dense = set(c["mlp_only_layers"] or ())
    channels = tuple("moe" if i not in dense and c["num_experts"] > 0
                     and (i + 1) % c["decoder_sparse_step"] == 0 else "swiglu"
                     for i in range(n))
    return tuple(_QWEN3_NEXT_MIXERS[t] for t in types), channels


def _qwen3_next_config(c: dict, require) -> ModelConfig:
    require("attention_bias", not c["attention_bias"], "false: q/k/v/o without biases")
    rope = _rope(c)
    require("rope_parameters", rope["rope_type"] == "default", "rope_type 'default'")
    mixers, channels = qwen3_next_layers(c)
    K, V = c["linear_key_head_dim"], c["linear_value_head_dim"]
    settings = {
        "gdn": dict(num_v_heads=c["linear_num_value_heads"], expand_v=V / K, use_gate=True,
                    allow_neg_eigval=False, short_conv=True,
                    conv_size=c["linear_conv_kernel_dim"]),
        "attn": dict(heads=c["num_attention_heads"], head_size=c["head_dim"],
                     num_kv_heads=c["num_key_value_heads"], rope_base=float(rope["rope_theta"]),
                     rope_fraction=float(rope["partial_rotary_factor"]), output_gate=True,
                     qk_norm=True),
        "moe": dict(num_experts=c["num_experts"], top_k=c["num_experts_per_tok"],
                    d_expert=c["moe_intermediate_size"], router="softmax",
                    norm_topk_prob=bool(c["norm_topk_prob"]),
                    d_shared=c["shared_expert_intermediate_size"], shared_gate=True,
                    aux_loss_weight=float(c["router_aux_loss_coef"])),
        "swiglu": dict(d_ff=c["intermediate_size"]),
    }
    pattern, channel_pattern = shortest_period(mixers), shortest_period(channels)
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["linear_num_key_heads"], head_dim=K, pattern=pattern,
        channel_pattern=channel_pattern,
        mixers={n: v for n, v in settings.items() if n in pattern + channel_pattern},
        rope_theta=float(rope["rope_theta"]), tie_embeddings=bool(c["tie_word_embeddings"]),
        norm_eps=float(c["rms_norm_eps"]), zero_centred_norms=True)


# Kimi Linear's layer types, our token mixers; its MLP kinds, our channel mixers.
_KIMI_MIXERS = {"linear_attention": "kda", "full_attention": "mla"}
_KIMI_CHANNELS = {"sparse": "moe", "dense": "swiglu"}
# KimiLinearConfig's attribute_map: the release writes the right-hand names, transformers reads
# either; the importer takes the release's.
_KIMI_ALIASES = {"num_local_experts": "num_experts", "num_experts_per_tok": "num_experts_per_token",
                 "n_shared_experts": "num_shared_experts", "norm_topk_prob": "moe_renormalize",
                 "n_group": "num_expert_group", "max_position_embeddings": "model_max_length"}
# linear_attn_config's keys, the config fields they set (KimiLinearConfig.__post_init__).
_KIMI_LINEAR_KEYS = {"num_heads": "linear_num_heads", "head_dim": "linear_head_dim",
                     "short_conv_kernel_size": "linear_conv_kernel_dim",
                     "kda_layers": None, "full_attn_layers": None}


def kimi_linear_layers(c: Mapping[str, Any]) -> tuple[tuple, tuple]:
    """(token mixers, channel mixers), one per layer, of a Kimi Linear config (defaults filled),
    as KimiLinearConfig decides: layer_types, else linear_attn_config's 1-indexed kda_layers /
    full_attn_layers, else full attention in every 4th layer from the 5th; mlp_layer_types,
    else dense MLPs in the first first_k_dense_replace layers and MoE after."""
    n, lin = c["num_hidden_layers"], c["linear_attn_config"] or {}
    types = c["layer_types"]
    if types is None and "kda_layers" in lin and "full_attn_layers" in lin:
        types = [None] * n
        for kind, layers in (("full_attention", lin["full_attn_layers"]),
                             ("linear_attention", lin["kda_layers"])):
            for i in layers:
                if not 1 <= i <= n:
                    raise ConversionError(f"hf config (kimi_linear): linear_attn_config lists "
                                          f"layer {i}; layers are 1 .. {n}")
                types[i - 1] = kind
    if types is None:
        types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    mlps = c["mlp_layer_types"] or ["dense" if i < c["first_k_dense_replace"] else "sparse"
                                    for i in range(n)]
    for field, got, kinds in (("layer_types", types, _KIMI_MIXERS),
                              ("mlp_layer_types", mlps, _KIMI_CHANNELS)):
        if len(got) != n or set(got) - set(kinds):
            raise ConversionError(f"hf config (kimi_linear): {field} must list {n} of "
                                  f"{sorted(kinds)}, got {got}")
    return tuple(_KIMI_MIXERS[t] for t in types), tuple(_KIMI_CHANNELS[t] for t in mlps)


def _kimi_linear_fields(hf: Mapping[str, Any]) -> dict:
    """The config with the attribute-map aliases under the release's names and
    linear_attn_config's widths in their fields (its layer lists stay there)."""
    c = dict(hf)
    for alias, name in _KIMI_ALIASES.items():
        if alias in c:
            v = c.pop(alias)
            if name in c and c[name] != v:
                raise ConversionError(f"hf config (kimi_linear): {alias} = {v!r} and {name} = "
                                      f"{c[name]!r} name the same field")
            c[name] = v
    lin = c.get("linear_attn_config") or {}
    unknown = sorted(set(lin) - set(_KIMI_LINEAR_KEYS))
    if unknown:
        raise ConversionError(f"hf config (kimi_linear): linear_attn_config has unsupported "
                              f"key(s) {unknown} (transformers' KimiLinearDeltaAttention has no "
                              f"such option)")
    c.update({f: lin[k] for k, f in _KIMI_LINEAR_KEYS.items() if f and k in lin})
    return c


def _kimi_linear_config(c: dict, require) -> ModelConfig:
    require("mla_use_nope", c["mla_use_nope"], "true: transformers' MLA applies no RoPE")
    require("moe_router_activation_func", c["moe_router_activation_func"] == "sigmoid",
            "'sigmoid'")
    require("moe_layer_freq", c["moe_layer_freq"] == 1,
            "1 (transformers places MoE by first_k_dense_replace / mlp_layer_types alone)")
    require("use_grouped_topk", c["use_grouped_topk"] or c["num_expert_group"] == 1,
            "true, or num_expert_group 1 (transformers always routes by groups)")
    require("num_nextn_predict_layers", c["num_nextn_predict_layers"] == 0,
            "0: no multi-token-prediction layers")
    require("num_key_value_heads", c["num_key_value_heads"] in (None, c["num_attention_heads"]),
            "num_attention_heads: MLA's keys and values have one head per query head")
    require("num_shared_experts", c["num_shared_experts"] >= 1, ">= 1")
    dn, dr = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    require("qk_head_dim", c["qk_head_dim"] in (None, dn + dr), "qk_nope_head_dim + "
                                                                "qk_rope_head_dim")
    mixers, channels = kimi_linear_layers(c)
    F = c["moe_intermediate_size"]
    settings = {
        "kda": dict(expand_v=1.0, allow_neg_eigval=False, short_conv=True,
                    conv_size=c["linear_conv_kernel_dim"], gate_bias=False),
        "mla": dict(heads=c["num_attention_heads"], q_lora_rank=c["q_lora_rank"],
                    kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=dn, qk_rope_head_dim=dr,
                    v_head_dim=c["v_head_dim"], rope=False,
                    attention_bias=bool(c["attention_bias"])),
        "moe": dict(num_experts=c["num_experts"], top_k=c["num_experts_per_token"],
                    d_expert=F, router="sigmoid", norm_topk_prob=bool(c["moe_renormalize"]),
                    routed_scaling_factor=float(c["routed_scaling_factor"]),
                    score_correction_bias=True, n_group=c["num_expert_group"],
                    topk_group=c["topk_group"], d_shared=F * c["num_shared_experts"],
                    shared_gate=False),
        "swiglu": dict(d_ff=c["intermediate_size"]),
    }
    pattern, channel_pattern = shortest_period(mixers), shortest_period(channels)
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["linear_num_heads"], head_dim=c["linear_head_dim"], pattern=pattern,
        channel_pattern=channel_pattern,
        mixers={n: v for n, v in settings.items() if n in pattern + channel_pattern},
        tie_embeddings=bool(c["tie_word_embeddings"]), norm_eps=float(c["rms_norm_eps"]))


_CONFIG_FROM = {"mamba2": _mamba2_config, "qwen3_next": _qwen3_next_config,
                "kimi_linear": _kimi_linear_config}


def hf_kind(cfg: ModelConfig) -> str:
    """The transformers model a ModelConfig exports as (by its token mixers)."""
    if "ssd" in cfg.pattern:
        return "mamba2"
    if set(cfg.pattern) <= {"gdn", "attn"}:
        return "qwen3_next"
    if set(cfg.pattern) <= {"kda", "mla"}:
        return "kimi_linear"
    raise ConversionError(f"export to hf: pattern {cfg.pattern} is none of transformers' "
                          f"models here: Mamba2 (ssd), Qwen3-Next (gdn, attn), Kimi Linear "
                          f"(kda, mla)")


def config_to_hf(cfg: ModelConfig) -> dict:
    """The transformers config.json (a dict) of a ModelConfig that Mamba2ForCausalLM,
    Qwen3NextForCausalLM or KimiLinearForCausalLM can express (`hf_kind`)."""
    return _CONFIG_TO[hf_kind(cfg)](cfg)


def _not_expressible(name: str, problems: list) -> None:
    if problems:
        raise ConversionError(f"export to hf: not expressible as {name}:\n  "
                              + "\n  ".join(problems))


def _differ(s: Mapping, want: Mapping, mixer: str) -> list:
    return [f"{mixer} {k} = {s[k]!r}: {what}" for k, (v, what) in want.items() if s[k] != v]


def _qwen3_next_to_hf(cfg: ModelConfig) -> dict:
    problems = [] if cfg.zero_centred_norms else [
        "zero_centred_norms = False: Qwen3-Next's norms scale by (1 + w)"]
    bad = sorted(set(cfg.channel_pattern) - {"moe", "swiglu"})
    if bad:
        problems.append(f"channel mixers {bad}: Qwen3-Next's MLPs are moe or swiglu")
    K, H = cfg.resolved_head_dim, cfg.num_heads
    out = dict(model_type="qwen3_next", architectures=[_ARCHITECTURES["qwen3_next"]],
               vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
               num_hidden_layers=cfg.num_layers, rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
               attention_bias=False, decoder_sparse_step=1, linear_num_key_heads=H,
               linear_key_head_dim=K, linear_value_head_dim=K, linear_num_value_heads=H,
               layer_types=[{v: k for k, v in _QWEN3_NEXT_MIXERS.items()}[m]
                            for m in cfg.layer_mixers],
               mlp_only_layers=[i for i in range(cfg.num_layers)
                                if cfg.layer_kinds(i)[1] == "swiglu"],
               num_experts=0, rope_parameters=dict(rope_type="default",
                                                   rope_theta=cfg.rope_theta,
                                                   partial_rotary_factor=1.0))
    if "gdn" in cfg.pattern:
        s = cfg.settings("gdn")
        problems += _differ(s, {"use_gate": (True, "Qwen3-Next gates its output norm"),
                                "short_conv": (True, "Qwen3-Next always has its conv"),
                                "allow_neg_eigval": (False, "Qwen3-Next's β = sigmoid")}, "gdn")
        V = int(round(K * s["expand_v"]))
        out.update(linear_value_head_dim=V, linear_num_value_heads=s["num_v_heads"] or H,
                   linear_conv_kernel_dim=s["conv_size"])
    if "attn" in cfg.pattern:
        s = cfg.settings("attn")
        problems += _differ(s, {"output_gate": (True, "Qwen3-Next gates attention's output"),
                                "qk_norm": (True, "Qwen3-Next normalises q and k"),
                                "qkv_bias": (False, "no biases"), "sinks": (False, "no sinks"),
                                "short_conv": (False, "no convs"),
                                "topk_blocks": (None, "dense attention")}, "attn")
        heads = s["heads"] or cfg.num_heads
        out.update(num_attention_heads=heads, head_dim=s["head_size"] or K,
                   num_key_value_heads=s["num_kv_heads"] or heads)
        out["rope_parameters"].update(rope_theta=s["rope_base"] or cfg.rope_theta,
                                      partial_rotary_factor=s["rope_fraction"])
    if "moe" in cfg.channel_pattern:
        s = cfg.settings("moe")
        problems += _differ(s, {"router": ("softmax", "Qwen3-Next routes by softmax"),
                                "shared_gate": (True, "Qwen3-Next gates its shared expert"),
                                "routed_scaling_factor": (1.0, "no scaling"),
                                "score_correction_bias": (False, "no bias")}, "moe")
        if s["d_shared"] < 1:
            problems.append("moe d_shared = 0: Qwen3-Next's MoE has a shared expert")
        out.update(num_experts=s["num_experts"], num_experts_per_tok=s["top_k"],
                   moe_intermediate_size=make_mixer(cfg, "moe").d_expert,
                   shared_expert_intermediate_size=s["d_shared"],
                   norm_topk_prob=s["norm_topk_prob"], router_aux_loss_coef=s["aux_loss_weight"])
    if "swiglu" in cfg.channel_pattern:
        out["intermediate_size"] = make_mixer(cfg, "swiglu").d_ff
    _not_expressible("Qwen3-Next", problems)
    return out


def _mamba2_to_hf(cfg: ModelConfig) -> dict:
    problems = []
    if set(cfg.pattern) != {"ssd"}:
        problems.append(f"pattern {cfg.pattern}: Mamba2 has ssd in every layer")
    if set(cfg.channel_pattern) != {"none"}:
        problems.append(f"channel_pattern {cfg.channel_pattern}: Mamba2 has no MLP "
                        f"(channel_pattern ('none',))")
    if problems:
        raise ConversionError("export to hf: not expressible as Mamba2:\n  "
                              + "\n  ".join(problems))
    s = cfg.settings("ssd")
    d, H, P = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    if not s["short_conv"]:
        problems.append("ssd short_conv = False: Mamba2 always has its conv")
    if (H * P) % d:
        problems.append(f"num_heads · head_dim = {H * P} is not a multiple of d_model = {d} "
                        f"(Mamba2Config's expand is a whole number)")
    if problems:
        raise ConversionError("export to hf: not expressible as Mamba2:\n  "
                              + "\n  ".join(problems))
    return dict(model_type="mamba2", architectures=[_ARCHITECTURES["mamba2"]],
                vocab_size=cfg.vocab_size, hidden_size=d, num_hidden_layers=cfg.num_layers,
                num_heads=H, head_dim=P, expand=H * P // d, state_size=s["d_state"],
                n_groups=s["ngroups"], conv_kernel=s["conv_size"],
                layer_norm_epsilon=cfg.norm_eps, use_bias=False, use_conv_bias=True,
                hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings)


def _kimi_linear_to_hf(cfg: ModelConfig) -> dict:
    problems = ["zero_centred_norms = True: Kimi Linear's norms scale by w"] \
        if cfg.zero_centred_norms else []
    bad = sorted(set(cfg.channel_pattern) - {"moe", "swiglu"})
    if bad:
        problems.append(f"channel mixers {bad}: Kimi Linear's MLPs are moe or swiglu")
    n = cfg.num_layers
    kinds = [cfg.layer_kinds(i) for i in range(n)]
    out = dict(model_type="kimi_linear", architectures=[_ARCHITECTURES["kimi_linear"]],
               vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=n,
               rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
               hidden_act="silu", linear_num_heads=cfg.num_heads,
               linear_head_dim=cfg.resolved_head_dim,
               layer_types=[{v: k for k, v in _KIMI_MIXERS.items()}[t] for t, _ in kinds],
               mlp_layer_types=[{v: k for k, v in _KIMI_CHANNELS.items()}[ch]
                                for _, ch in kinds],
               pad_token_id=None, bos_token_id=None, eos_token_id=None)
    out["linear_attn_config"] = dict(
        num_heads=cfg.num_heads, head_dim=cfg.resolved_head_dim,
        kda_layers=[i + 1 for i, (t, _) in enumerate(kinds) if t == "kda"],
        full_attn_layers=[i + 1 for i, (t, _) in enumerate(kinds) if t == "mla"])
    if "kda" in cfg.pattern:
        s = cfg.settings("kda")
        problems += _differ(s, {"gate_bias": (False, "Kimi Linear's g_b_proj has no bias"),
                                "short_conv": (True, "Kimi Linear always has its convs"),
                                "allow_neg_eigval": (False, "Kimi Linear's β = sigmoid"),
                                "expand_v": (1.0, "values as wide as keys"),
                                "num_v_heads": (None, "no grouped value heads"),
                                "lower_bound": (None, "Kimi Linear's unbounded gate")}, "kda")
        out["linear_conv_kernel_dim"] = out["linear_attn_config"]["short_conv_kernel_size"] = \
            s["conv_size"]
    if "mla" in cfg.pattern:
        s = cfg.settings("mla")
        problems += _differ(s, {"rope": (False, "Kimi Linear's MLA has no RoPE")}, "mla")
        d = make_mixer(cfg, "mla")
        out.update(num_attention_heads=d.num_heads, num_key_value_heads=d.num_heads,
                   q_lora_rank=d.q_lora_rank, kv_lora_rank=d.kv_lora_rank,
                   qk_nope_head_dim=d.qk_nope_head_dim, qk_rope_head_dim=d.qk_rope_head_dim,
                   v_head_dim=d.v_head_dim, attention_bias=d.attention_bias)
    if "moe" in cfg.channel_pattern:
        s = cfg.settings("moe")
        problems += _differ(s, {"router": ("sigmoid", "Kimi Linear routes by sigmoid scores"),
                                "score_correction_bias": (True, "Kimi Linear's router has "
                                                                "e_score_correction_bias"),
                                "shared_gate": (False, "no shared expert gate")}, "moe")
        F = make_mixer(cfg, "moe").d_expert
        if s["d_shared"] < 1 or s["d_shared"] % F:
            problems.append(f"moe d_shared = {s['d_shared']}: Kimi Linear's shared experts are "
                            f"a whole number (>= 1) of d_expert = {F}")
        out.update(num_experts=s["num_experts"], num_experts_per_token=s["top_k"],
                   moe_intermediate_size=F, num_shared_experts=s["d_shared"] // F,
                   moe_renormalize=s["norm_topk_prob"], num_expert_group=s["n_group"],
                   topk_group=s["topk_group"],
                   routed_scaling_factor=s["routed_scaling_factor"])
    if "swiglu" in cfg.channel_pattern:
        out["intermediate_size"] = make_mixer(cfg, "swiglu").d_ff
    _not_expressible("Kimi Linear", problems)
    return out


_CONFIG_TO = {"mamba2": _mamba2_to_hf, "qwen3_next": _qwen3_next_to_hf,
              "kimi_linear": _kimi_linear_to_hf}


# ------------------------------------------------------------------------------ tensors
def tensor_map(cfg: ModelConfig) -> list:
    """[(hf tensor name, [our parts: param paths (tuples of keys, without scan_layers) or
    `Stacked` slices of them], how)]: each tensor is its parts' PyTorch forms concatenated
    along its first axis (in the row order of `how`, if it has one)."""
    return _TENSOR_MAP[hf_kind(cfg)](cfg)


def _qwen3_next_tensors(cfg: ModelConfig) -> list:
    out = [("model.embed_tokens.weight", [("embed", "embedding")], "same"),
           ("model.norm.weight", [("final_norm", "scale")], "flat")]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", [("lm_head", "kernel")], _DENSE))
    for i in range(cfg.num_layers):
        pre, layer = f"model.layers.{i}.", f"layer_{i}"
        m, mlp = (layer, "mixer"), (layer, "mlp")
        out += [(pre + "input_layernorm.weight", [(layer, "mixer_norm", "scale")], "flat"),
                (pre + "post_attention_layernorm.weight", [(layer, "mlp_norm", "scale")],
                 "flat")]
        token, channel = cfg.layer_kinds(i)
        if token == "gdn":
            out += _qwen3_next_gdn(cfg, pre + "linear_attn.", m)
        else:
            a = pre + "self_attn."
            out += [(a + f"{n}_proj.weight", [m + (f"{n}_proj", "kernel")], _DENSE)
                    for n in "qkv"]
            out += [(a + f"{n}_norm.weight", [m + (f"{n}_norm", "scale")], "flat") for n in "qk"]
            out.append((a + "o_proj.weight", [m + ("o_proj", "kernel")], _DENSE2))
        swiglu = lambda hf, ours: [(hf + f"{n}.weight", [ours + (w, "kernel")], _DENSE)
                                   for n, w in _SWIGLU]
        if channel == "swiglu":
            out += swiglu(pre + "mlp.", mlp)
            continue
        out += [(pre + "mlp.gate.weight", [mlp + ("router", "kernel")], _DENSE),
                (pre + "mlp.shared_expert_gate.weight", [mlp + ("shared_expert_gate", "kernel")],
                 _DENSE)]
        out += swiglu(pre + "mlp.shared_expert.", mlp + ("shared_expert",))
        for e in range(cfg.settings("moe")["num_experts"]):
            out += [(pre + f"mlp.experts.{e}.{n}.weight", [Stacked(mlp + (w,), e)], _DENSE)
                    for n, w in _SWIGLU]
    return out


# transformers' SwiGLU Linear names, ours.
_SWIGLU = (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_out"))


def _qwen3_next_gdn(cfg: ModelConfig, pre: str, m: tuple) -> list:
    """A GDN layer's tensors. in_proj_qkvz's rows are, per key head, [q (K) | k (K) | v (r·V) |
    z (r·V)] (r = value heads per key head), in_proj_ba's [b (r) | a (r)]
    (Qwen3NextGatedDeltaNet.fix_query_key_value_ordering): the row orders gather them into
    q | k | v | z and b | a, which split into our q/k/v/g and b/a projections. The conv's
    channels are q | k | v, as our three convs."""
    H, K = cfg.num_heads, cfg.resolved_head_dim
    s = cfg.settings("gdn")
    Hv = s["num_v_heads"] or H
    r, V = Hv // H, int(round(K * s["expand_v"]))
    widths = (K, K, r * V, r * V)
    starts = np.cumsum((0,) + widths[:-1])
    qkvz = np.concatenate([h * sum(widths) + start + np.arange(w)
                           for start, w in zip(starts, widths) for h in range(H)])
    ba = np.concatenate([h * 2 * r + start + np.arange(r) for start in (0, r)
                         for h in range(H)])
    return [(pre + "in_proj_qkvz.weight", [m + (f"{n}_proj", "kernel") for n in "qkvg"],
             _DENSE + (qkvz,)),
            (pre + "in_proj_ba.weight", [m + (f"{n}_proj", "kernel") for n in "ba"],
             _DENSE + (ba,)),
            (pre + "conv1d.weight", [m + (f"{n}_conv", "kernel") for n in "qkv"], "conv"),
            (pre + "norm.weight", [m + ("o_norm", "scale")], "flat"),
            (pre + "out_proj.weight", [m + ("o_proj", "kernel")], _DENSE2),
            (pre + "A_log", [m + ("A_log",)], "flat"),
            (pre + "dt_bias", [m + ("dt_bias",)], "flat")]


def _mamba2_tensors(cfg: ModelConfig) -> list:
    out = [("backbone.embeddings.weight", [("embed", "embedding")], "same"),
           ("backbone.norm_f.weight", [("final_norm", "scale")], "flat")]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", [("lm_head", "kernel")], _DENSE))
    for i in range(cfg.num_layers):
        pre, m = f"backbone.layers.{i}.", (f"layer_{i}", "mixer")
        out += [(pre + "norm.weight", [(f"layer_{i}", "mixer_norm", "scale")], "flat"),
                (pre + "mixer.in_proj.weight",
                 [m + (f"{n}_proj", "kernel") for n in ("z", "x", "B", "C", "dt")], _DENSE),
                (pre + "mixer.conv1d.weight", [m + (f"{n}_conv", "kernel") for n in "xBC"],
                 "conv"),
                (pre + "mixer.conv1d.bias", [m + (f"{n}_conv", "bias") for n in "xBC"], "flat"),
                (pre + "mixer.norm.weight", [m + ("o_norm", "scale")], "flat"),
                (pre + "mixer.out_proj.weight", [m + ("o_proj", "kernel")], _DENSE2)]
        out += [(pre + f"mixer.{n}", [m + (n,)], "flat") for n in ("dt_bias", "A_log", "D")]
    return out


def _kimi_linear_tensors(cfg: ModelConfig) -> list:
    """Kimi Linear's tensors as save_pretrained writes them (the release's layout: transformers
    maps it to its modules when loading): the KDA layers' q/k/v convs apart and the forget gate
    (f_a_proj, f_b_proj, A_log [1, 1, H, 1], dt_bias [H·K]) on self_attn; every MLP under
    block_sparse_moe (the release names the dense ones mlp.: `import_hf` reads both), the
    experts' w1 (gate), w2 (down), w3 (up) per expert, the router's weight and
    e_score_correction_bias on its gate."""
    out = [("model.embed_tokens.weight", [("embed", "embedding")], "same"),
           ("model.norm.weight", [("final_norm", "scale")], "flat")]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", [("lm_head", "kernel")], _DENSE))
    for i in range(cfg.num_layers):
        pre, layer = f"model.layers.{i}.", f"layer_{i}"
        m, mlp, a = (layer, "mixer"), (layer, "mlp"), pre + "self_attn."
        out += [(pre + "input_layernorm.weight", [(layer, "mixer_norm", "scale")], "flat"),
                (pre + "post_attention_layernorm.weight", [(layer, "mlp_norm", "scale")],
                 "flat")]
        token, channel = cfg.layer_kinds(i)
        out += (_kimi_kda if token == "kda" else _kimi_mla)(cfg, a, m)
        b = pre + "block_sparse_moe."
        swiglu = lambda hf, ours: [(hf + f"{n}.weight", [ours + (w, "kernel")], _DENSE)
                                   for n, w in _SWIGLU]
        if channel == "swiglu":
            out += swiglu(b, mlp)
            continue
        out += [(b + "gate.weight", [mlp + ("router", "kernel")], _DENSE),
                (b + "gate.e_score_correction_bias", [mlp + ("score_bias",)], "flat")]
        out += swiglu(b + "shared_experts.", mlp + ("shared_expert",))
        for e in range(cfg.settings("moe")["num_experts"]):
            out += [(b + f"experts.{e}.{n}.weight", [Stacked(mlp + (w,), e)], _DENSE)
                    for n, w in (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_out"))]
    return out


def _kimi_kda(cfg: ModelConfig, a: str, m: tuple) -> list:
    out = [(a + f"{n}_proj.weight", [m + (f"{n}_proj", "kernel")], _DENSE) for n in "qkvb"]
    out += [(a + f"{n}_conv1d.weight", [m + (f"{n}_conv", "kernel")], "conv") for n in "qkv"]
    return out + [(a + "f_a_proj.weight", [m + ("gk_proj_a", "kernel")], _DENSE),
                  (a + "f_b_proj.weight", [m + ("gk_proj_b", "kernel")], _DENSE),
                  (a + "A_log", [m + ("A_log",)], ("shaped", (1, 1, -1, 1))),
                  (a + "dt_bias", [m + ("dt_bias",)], "flat"),
                  (a + "g_a_proj.weight", [m + ("g_proj_a", "kernel")], _DENSE),
                  (a + "g_b_proj.weight", [m + ("g_proj_b", "kernel")], _DENSE),
                  (a + "o_norm.weight", [m + ("o_norm", "scale")], "flat"),
                  (a + "o_proj.weight", [m + ("o_proj", "kernel")], _DENSE2)]


def _kimi_mla(cfg: ModelConfig, a: str, m: tuple) -> list:
    """An MLA layer's tensors (no RoPE, so no rows to de-interleave): per head, q's outputs
    are [nope | rope] and kv_b_proj's [k_nope | v], kv_a_proj_with_mqa's [latent | k_rope], as
    our kernels'."""
    s = cfg.settings("mla")
    out = [(a + "kv_a_proj_with_mqa.weight", [m + ("kv_down_proj", "kernel")], _DENSE),
           (a + "kv_a_layernorm.weight", [m + ("kv_norm", "scale")], "flat"),
           (a + "kv_b_proj.weight", [m + ("kv_up_proj", "kernel")], _DENSE),
           (a + "o_proj.weight", [m + ("o_proj", "kernel")], _DENSE2)]
    if s["q_lora_rank"] is None:
        out.append((a + "q_proj.weight", [m + ("q_proj", "kernel")], _DENSE))
    else:
        out += [(a + "q_a_proj.weight", [m + ("q_down_proj", "kernel")], _DENSE),
                (a + "q_a_layernorm.weight", [m + ("q_norm", "scale")], "flat"),
                (a + "q_b_proj.weight", [m + ("q_up_proj", "kernel")], _DENSE)]
    if s["attention_bias"]:
        out += [(a + f"{n}.bias", [m + (ours, "bias")], "flat")
                for n, ours in (("kv_a_proj_with_mqa", "kv_down_proj"), ("o_proj", "o_proj"))
                + ((("q_a_proj", "q_down_proj"),) if s["q_lora_rank"] is not None else ())]
    return out


_TENSOR_MAP = {"mamba2": _mamba2_tensors, "qwen3_next": _qwen3_next_tensors,
               "kimi_linear": _kimi_linear_tensors}
# The input embedding's tensor (a tied lm_head.weight must equal it).
_EMBEDDING = {"mamba2": "backbone.embeddings.weight", "qwen3_next": "model.embed_tokens.weight",
              "kimi_linear": "model.embed_tokens.weight"}


# ------------------------------------------------------------------------------ files
def read_hf(path: str) -> tuple[dict, dict]:
    """(config.json as a dict, {tensor name: NumPy array}) of a transformers checkpoint
    directory."""
    return read_hf_dir(path, "hf")


def import_hf(path: str, lazy: bool = False) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a transformers checkpoint directory; params a plain nested dict
    of float32 NumPy arrays, as `LanguageModel(cfg).apply({"params": params}, tokens)` takes,
    or with `lazy` of `LazyParam`s in the checkpoint's dtype, each read when it is loaded
    (what `save_workdir` writes one at a time)."""
    config, tensors = read_hf(path)
    cfg = config_from_hf(config)
    c = dict(_DEFAULTS[config["model_type"]], **config)
    if c["model_type"] == "qwen3_next":
        # The release's multi-token-prediction head: transformers' model does not load it
        # either (_keys_to_ignore_on_load_unexpected); it plays no part in the forward.
        return cfg, params_from_hf(cfg, tensors.without(lambda n: n.startswith("mtp.")), lazy)
    if c["model_type"] == "kimi_linear":
        # The release names its dense MLPs mlp., save_pretrained every MLP block_sparse_moe.
        names = {n.replace(".mlp.", ".block_sparse_moe."): n for n in tensors}
        return cfg, params_from_hf(cfg, RenamedTensors(tensors, names), lazy)
    tensors = dict(tensors)     # Mamba2's fix-ups below (its checkpoints are small)
    if "backbone.embedding.weight" in tensors:   # the original checkpoints' name
        tensors.setdefault("backbone.embeddings.weight", tensors.pop("backbone.embedding.weight"))
    if not c["use_conv_bias"]:                   # no bias: a zero one computes the same
        for i in range(cfg.num_layers):
            w = tensors.get(f"backbone.layers.{i}.mixer.conv1d.weight")
            if w is not None:
                tensors.setdefault(f"backbone.layers.{i}.mixer.conv1d.bias",
                                   np.zeros(w.shape[0], np.float32))
    return cfg, params_from_hf(cfg, tensors, lazy)


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                   lazy: bool = False) -> dict:
    return params_from_tensors(cfg, tensors, tensor_map(cfg), "hf", _EMBEDDING[hf_kind(cfg)],
                               lazy)


def export_hf(cfg: ModelConfig, params: Mapping, path: str) -> None:
    """Write `cfg` and `params` (with or without scan_layers) as a transformers checkpoint
    directory (config.json + model.safetensors, float32) that `Mamba2ForCausalLM` and
    `import_hf` load."""
    from safetensors.numpy import save_file

    hf_cfg = config_to_hf(cfg)
    tensors = tensors_from_params(cfg, params, tensor_map(cfg), "hf")
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
