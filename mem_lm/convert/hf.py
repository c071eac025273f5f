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
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from mem_lm.config import ModelConfig
from mem_lm.model import make_mixer
from mem_lm.convert.common import (ConversionError, Stacked, params_from_tensors,
                                   read_hf_dir, shortest_period, tensors_from_params)

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
_ARCHITECTURES = {"mamba2": "Mamba2ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}
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
    c = dict(_DEFAULTS[model_type])
    c.update(hf)
    unknown = sorted(set(hf) - set(_DEFAULTS[model_type]) - _NO_EFFECT)
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


_CONFIG_FROM = {"mamba2": _mamba2_config, "qwen3_next": _qwen3_next_config}


def hf_kind(cfg: ModelConfig) -> str:
    """The transformers model a ModelConfig exports as (by its token mixers)."""
    if "ssd" in cfg.pattern:
        return "mamba2"
    if set(cfg.pattern) <= {"gdn", "attn"}:
        return "qwen3_next"
    raise ConversionError(f"export to hf: pattern {cfg.pattern} is none of transformers' "
                          f"models here: Mamba2 (ssd), Qwen3-Next (gdn, attn)")


def config_to_hf(cfg: ModelConfig) -> dict:
    """The transformers config.json (a dict) of a ModelConfig that Mamba2ForCausalLM or
    Qwen3NextForCausalLM can express (`hf_kind`)."""
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


_CONFIG_TO = {"mamba2": _mamba2_to_hf, "qwen3_next": _qwen3_next_to_hf}


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


_TENSOR_MAP = {"mamba2": _mamba2_tensors, "qwen3_next": _qwen3_next_tensors}
# The input embedding's tensor (a tied lm_head.weight must equal it).
_EMBEDDING = {"mamba2": "backbone.embeddings.weight", "qwen3_next": "model.embed_tokens.weight"}


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
