"""Checkpoints in and out of flash-linear-attention's (fla) Hugging Face format: a directory
with `config.json` and `model.safetensors` (or shards listed in `model.safetensors.index.json`)
as `fla.models.*ForCausalLM.save_pretrained` writes them.

    cfg, params = import_fla("path/to/fla_model")      # ModelConfig, plain nested dict (float32)
    export_fla(cfg, params, "path/to/out")              # config.json + model.safetensors

    python -m mem_lm.convert --from fla PATH --out WORKDIR   # a workdir load_pretrained reads
    python -m mem_lm.convert --to fla WORKDIR --out PATH     # (the CLI: mem_lm/convert/__init__.py)

Kinds (fla `model_type`): gated_deltanet -> `gdn`, delta_net -> `deltanet`, gla -> `gla`,
kda -> `kda` (lower_bound mapped; safe_gate only picks fla's kernel and its A_log init, and is
exported as lower_bound in [-5, 0)), each with fla's hybrid `attn` layers -> `attn` (full) or
`swa` (window_size); mom -> `mom` with
q_conv_per_memory (fla's MomAttention convolves q over each memory's tokens), no hybrid layers
(fla's MomBlock cannot run its attention layers); nsa -> `nsa` in fla's variant (compress
"mean", shared_kv, cmp_block = cmp_stride = sel_block = block_size, sel_blocks = block_counts,
window = window_size, 0 for none); retnet -> `retnet`; linear_attn -> `la` (feature maps elu,
identity). Every field of
config.json is either mapped, known to leave the forward unchanged (listed in _NO_EFFECT), or
an error naming it; every tensor is mapped once or the import fails listing what is left
over or missing. Safetensors are read and written with the `safetensors` package's NumPy API
(no torch). PyTorch `Linear` weights are [out, in]; our kernels are [in..., out...].
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from mem_lm.config import ModelConfig
from mem_lm.convert.common import (ConversionError, layer_params, param_shapes,
                                   params_from_tensors, read_hf_dir, shortest_period, to_torch)

# config.json fields of fla's models that do not change the function the model computes
# (kernel choice, fused-op switches, loss and generation settings, HF bookkeeping). fla's
# DeltaNet ignores use_output_norm and its GLA ignores use_gk / use_gv: the layers never read
# them.
_NO_EFFECT = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "attn_mode", "use_cache", "initializer_range", "max_position_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "fuse_norm", "fuse_swiglu",
    "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "tie_encoder_decoder",
    "is_encoder_decoder", "chunk_size_feed_forward", "problem_type", "tokenizer_class",
    "id2label", "label2id", "_name_or_path", "name_or_path",
}
_NO_EFFECT_OF = {"delta_net": {"use_output_norm"}, "gla": {"use_gk", "use_gv"},
                 # fla's MoM stores these and never reads them (it drops no tokens).
                 "mom": {"capacity", "use_layer_wise_balance"},
                 # fla's NSA model builds its norms without reading it.
                 "nsa": {"elementwise_affine"},
                 # fla's RetNetBlock does not pass them to its MultiScaleRetention: no convs.
                 "retnet": {"use_short_conv", "conv_size"},
                 # A kernel switch (fla's M=16 TensorCore path for gates bounded by
                 # lower_bound) and A_log's init: the gate is lower_bound's choice.
                 "kda": {"safe_gate"}}

# fla's defaults (fla-core 0.6.0 configuration_*.py) for fields a config.json may omit.
_COMMON_DEFAULTS = dict(hidden_ratio=4, intermediate_size=None, hidden_act="swish",
                        norm_eps=1e-6, attn=None, tie_word_embeddings=False,
                        attnres_block_size=None, vocab_size=32000)
_DEFAULTS = {
    "gated_deltanet": dict(_COMMON_DEFAULTS, hidden_size=2048, expand_v=2.0, use_gate=True,
                           use_short_conv=True, allow_neg_eigval=False, conv_size=4,
                           head_dim=256, num_heads=6, num_v_heads=None, num_hidden_layers=21,
                           output_gate_activation="swish"),
    "kda": dict(_COMMON_DEFAULTS, hidden_size=2048, expand_v=1.0, use_short_conv=True,
                allow_neg_eigval=False, safe_gate=False, lower_bound=None, conv_size=4,
                head_dim=128, num_heads=16, num_v_heads=None, num_hidden_layers=24),
    "delta_net": dict(_COMMON_DEFAULTS, hidden_size=2048, expand_k=1.0, expand_v=1.0,
                      use_gate=False, use_short_conv=True, allow_neg_eigval=False, conv_size=4,
                      use_beta=True, num_heads=16, qk_norm="l2", qk_activation="silu",
                      num_hidden_layers=24),
    "gla": dict(_COMMON_DEFAULTS, hidden_size=2048, expand_k=0.5, expand_v=1.0,
                num_hidden_layers=24, num_heads=4, num_kv_heads=None, feature_map=None,
                use_short_conv=False, conv_size=4, use_output_gate=True, clamp_min=None,
                elementwise_affine=True),
    "nsa": dict(_COMMON_DEFAULTS, hidden_size=2048, num_hidden_layers=24, num_heads=64,
                num_kv_heads=4, head_dim=32, qkv_bias=False, block_size=64, block_counts=16,
                window_size=512, rope_theta=10000.0, elementwise_affine=True),
    "mom": dict(_COMMON_DEFAULTS, hidden_size=2048, conv_size=4, num_heads=4, head_dim=256,
                expand_v=1.0, use_output_gate=True, use_short_conv=True, num_hidden_layers=24,
                num_memories=4, topk=2, aux_loss_scale=0.01, shared_mem=True,
                single_kv_proj=False, mom_backend="gated_deltanet"),
    "retnet": dict(_COMMON_DEFAULTS, hidden_size=2048, hidden_ratio=2, expand_k=1.0,
                   expand_v=2.0, num_hidden_layers=24, num_heads=8, num_kv_heads=None,
                   feature_map=None, use_short_conv=False, conv_size=4, use_output_gate=True,
                   elementwise_affine=True),
    "linear_attn": dict(_COMMON_DEFAULTS, hidden_size=2048, expand_k=1.0, expand_v=1.0,
                        num_hidden_layers=24, num_heads=4, num_kv_heads=None,
                        feature_map="elementwise_product", tie_feature_map_qk=False,
                        norm_q=False, norm_k=False, norm_feature_map=False,
                        elementwise_affine=True),
}
_ARCHITECTURES = {"gated_deltanet": "GatedDeltaNetForCausalLM", "kda": "KDAForCausalLM",
                  "delta_net": "DeltaNetForCausalLM", "gla": "GLAForCausalLM",
                  "mom": "MomForCausalLM", "nsa": "NSAForCausalLM",
                  "retnet": "RetNetForCausalLM", "linear_attn": "LinearAttentionForCausalLM"}
_MIXER_OF = {"gated_deltanet": "gdn", "kda": "kda", "delta_net": "deltanet", "gla": "gla",
             "mom": "mom",
             "nsa": "nsa", "retnet": "retnet", "linear_attn": "la"}
_TYPE_OF = {m: t for t, m in _MIXER_OF.items()}
_ATTENTION = ("attn", "swa")
# fla's GLA layer takes these from its own defaults, not from the config.
_GLA_GATE_RANK, _GLA_GATE_NORMALIZER = 16, 16.0


def fla_mlp_width(hidden_size: int, hidden_ratio: Optional[float],
                  intermediate_size: Optional[int]) -> int:
    """The hidden width of fla's GatedMLP: intermediate_size, else 2/3 · hidden_ratio (4) ·
    hidden_size rounded up to a multiple of 256."""
    if intermediate_size is not None:
        return int(intermediate_size)
    width = int(hidden_size * (4 if hidden_ratio is None else hidden_ratio) * 2 / 3)
    return 256 * ((width + 255) // 256)


# ------------------------------------------------------------------------------ config
def _whole(value: float, what: str) -> int:
    if not math.isclose(value, round(value)):
        raise ConversionError(f"fla config: {what} = {value} is not a whole number")
    return int(round(value))


def _attention_specs(attn, num_layers: int) -> dict:
    """{layer: our attention mechanism name and settings} of fla's `attn` field."""
    if attn is None:
        return {}
    specs = [attn] if isinstance(attn, Mapping) else list(attn)
    known = {"layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta"}
    out, used = {}, {}
    for spec in specs:
        extra = sorted(set(spec) - known)
        if extra:
            raise ConversionError(f"fla config: attn field(s) {extra} are not supported "
                                  f"(supported: {sorted(known)})")
        window = spec.get("window_size")
        name = "attn" if window is None else "swa"
        settings = {"heads": spec["num_heads"],
                    "num_kv_heads": spec.get("num_kv_heads") or spec["num_heads"],
                    "qkv_bias": bool(spec.get("qkv_bias", False)),
                    "rope_base": float(spec.get("rope_theta", 10000.0))}
        if window is not None:
            settings["window"] = window
        if used.setdefault(name, settings) != settings:
            raise ConversionError(f"fla config: attn specs with different settings for the "
                                  f"same kind ({name}) are not supported: {used[name]} and "
                                  f"{settings}")
        for layer in spec["layers"]:
            if not 0 <= layer < num_layers:
                raise ConversionError(f"fla config: attn layer {layer} is outside "
                                      f"[0, {num_layers})")
            out[layer] = (name, settings)
    return out


def config_from_fla(fla: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of an fla config.json (a dict)."""
    model_type = fla.get("model_type")
    if model_type not in _DEFAULTS:
        raise ConversionError(f"fla config: model_type {model_type!r} is not supported; "
                              f"supported: {sorted(_DEFAULTS)}")
    c = dict(_DEFAULTS[model_type])
    c.update(fla)
    unknown = sorted(set(fla) - set(_DEFAULTS[model_type]) - _NO_EFFECT
                     - _NO_EFFECT_OF.get(model_type, set()))
    if unknown:
        raise ConversionError(f"fla config ({model_type}): unsupported field(s) {unknown}; "
                              f"nothing is dropped silently, so remove them only if they do "
                              f"not change the model")

    def require(field, allowed):
        if c[field] not in allowed:
            raise ConversionError(f"fla config ({model_type}): {field} = {c[field]!r} is not "
                                  f"supported (supported: {list(allowed)})")

    require("hidden_act", ("swish",))
    require("attnres_block_size", (None,))
    if model_type == "nsa":
        return _nsa_config(c, require)
    d, L, H = c["hidden_size"], c["num_hidden_layers"], c["num_heads"]
    mixer = _MIXER_OF[model_type]
    conv = {"short_conv": bool(c.get("use_short_conv", False)),   # linear_attn has neither
            "conv_size": c.get("conv_size", 4)}
    if model_type == "gated_deltanet":
        require("output_gate_activation", ("swish", "silu"))
        head_dim = c["head_dim"]
        hv = c["num_v_heads"]
        settings = dict(conv, expand_v=float(c["expand_v"]), use_gate=bool(c["use_gate"]),
                        allow_neg_eigval=bool(c["allow_neg_eigval"]),
                        num_v_heads=None if hv in (None, H) else hv)
    elif model_type == "kda":
        head_dim, hv, lb = c["head_dim"], c["num_v_heads"], c["lower_bound"]
        settings = dict(conv, expand_v=float(c["expand_v"]),
                        allow_neg_eigval=bool(c["allow_neg_eigval"]),
                        num_v_heads=None if hv in (None, H) else hv,
                        lower_bound=None if lb is None else float(lb))
    elif model_type == "mom":
        head_dim, settings = c["head_dim"], _mom_settings(c, conv, require)
    elif model_type in ("retnet", "linear_attn"):
        head_dim, settings = _retnet_la_settings(model_type, c, require)
    else:
        head_dim = _whole(d * c["expand_k"], "hidden_size · expand_k") // H
        value_dim = _whole(d * c["expand_v"], "hidden_size · expand_v") // H
        if model_type == "delta_net":
            require("use_beta", (True,))
            require("qk_norm", ("l2",))
            require("qk_activation", ("silu",))
            settings = dict(conv, expand_v=value_dim / head_dim, use_gate=bool(c["use_gate"]),
                            allow_neg_eigval=bool(c["allow_neg_eigval"]))
        else:
            require("feature_map", (None,))
            require("clamp_min", (None,))
            require("use_output_gate", (True,))
            require("elementwise_affine", (True,))
            if c["num_kv_heads"] not in (None, H):
                raise ConversionError(f"fla config (gla): num_kv_heads = {c['num_kv_heads']} "
                                      f"(grouped keys) is not supported")
            settings = dict(conv, expand_v=value_dim / head_dim, gate_rank=_GLA_GATE_RANK,
                            gate_normalizer=_GLA_GATE_NORMALIZER)
    attn = _attention_specs(c["attn"], L)
    layers = tuple(attn[i][0] if i in attn else mixer for i in range(L))
    mixers = {mixer: settings,
              "swiglu": {"d_ff": fla_mlp_width(d, c["hidden_ratio"], c["intermediate_size"])}}
    for name, s in attn.values():
        if d % s["heads"]:
            raise ConversionError(f"fla config: attn num_heads = {s['heads']} must divide "
                                  f"hidden_size = {d}")
        mixers[name] = dict(s, head_size=d // s["heads"])
    return ModelConfig(vocab_size=c["vocab_size"], d_model=d, num_layers=L, num_heads=H,
                       head_dim=head_dim, pattern=shortest_period(layers),
                       channel_pattern=("swiglu",), mixers=mixers,
                       tie_embeddings=bool(c["tie_word_embeddings"]),
                       norm_eps=float(c["norm_eps"]))


def _mom_settings(c: Mapping[str, Any], conv: dict, require) -> dict:
    """Our `mom` settings of an fla MomConfig (with its defaults filled in)."""
    require("mom_backend", ("gated_deltanet",))
    require("use_output_gate", (True,))
    require("use_short_conv", (True,))      # fla's MomAttention refuses to run without
    require("single_kv_proj", (False,))
    require("attn", (None,))                # MomBlock cannot unpack its Attention's outputs
    return dict(conv, num_memories=c["num_memories"], top_k=c["topk"],
                shared_memory=bool(c["shared_mem"]), capacity_factor=None,
                aux_loss_weight=float(c["aux_loss_scale"]), expand_v=float(c["expand_v"]),
                q_conv_per_memory=True)


def _mom_to_fla(s: Mapping[str, Any], problems: list) -> dict:
    """The MomConfig fields of our `mom` settings; what fla's MoM cannot express goes to
    `problems`."""
    if not s["q_conv_per_memory"]:
        problems.append("mom q_conv_per_memory = False: fla's MomAttention convolves q over each "
                        "memory's own tokens (q_conv_per_memory = True)")
    if s["capacity_factor"] is not None:
        problems.append(f"mom capacity_factor = {s['capacity_factor']}: fla's MoM drops no tokens")
    if not s["short_conv"]:
        problems.append("mom short_conv = False: fla's MomAttention requires its short convs")
    return dict(num_memories=s["num_memories"], topk=s["top_k"], shared_mem=s["shared_memory"],
                aux_loss_scale=s["aux_loss_weight"], expand_v=s["expand_v"],
                use_output_gate=True, single_kv_proj=False, mom_backend="gated_deltanet")


# Feature maps of fla's LinearAttention that are ours (elu: elu + 1, both sides).
_LA_FEATURE_MAPS = ("elu", "identity")


def _retnet_la_settings(model_type: str, c: Mapping[str, Any], require) -> tuple[int, dict]:
    """(head_dim, our `retnet` / `la` settings) of an fla RetNetConfig / LinearAttentionConfig
    (with its defaults filled in). Neither fla layer has short convs here (RetNetBlock never
    passes use_short_conv; LinearAttention has none)."""
    d, H = c["hidden_size"], c["num_heads"]
    head_dim = _whole(d * c["expand_k"], "hidden_size · expand_k") // H
    value_dim = _whole(d * c["expand_v"], "hidden_size · expand_v") // H
    require("elementwise_affine", (True,))
    if c["num_kv_heads"] not in (None, H):
        raise ConversionError(f"fla config ({model_type}): num_kv_heads = {c['num_kv_heads']} "
                              f"(grouped keys) is not supported")
    if model_type == "retnet":
        require("feature_map", (None,))
        require("use_output_gate", (True,))
        return head_dim, dict(short_conv=False, expand_v=value_dim / head_dim)
    require("feature_map", _LA_FEATURE_MAPS)
    for field in ("norm_q", "norm_k", "norm_feature_map"):
        require(field, (False,))
    if value_dim != head_dim:
        raise ConversionError(f"fla config (linear_attn): expand_v = {c['expand_v']} differs "
                              f"from expand_k = {c['expand_k']}; our la has value heads as wide "
                              f"as its key heads")
    return head_dim, dict(short_conv=False, feature_map=c["feature_map"])


def _retnet_la_to_fla(cfg: ModelConfig, mixer: str, s: Mapping[str, Any], out: dict,
                      problems: list) -> None:
    """Fill `out` (config_to_fla's common fields) for a `retnet` or `la` model; what fla
    cannot express goes to `problems`."""
    d, H, K = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    if s["short_conv"]:
        problems.append(f"{mixer} short_conv: fla's {_ARCHITECTURES[_TYPE_OF[mixer]]} has no "
                        f"short convs")
    if mixer == "retnet":
        if cfg.rope_theta != 10000.0:
            problems.append(f"rope_theta = {cfg.rope_theta}: fla's MultiScaleRetention "
                            f"rotates with base 10000")
        out.update(expand_k=H * K / d, expand_v=H * int(round(K * s["expand_v"])) / d,
                   feature_map=None, use_output_gate=True)
        return
    if s["feature_map"] not in _LA_FEATURE_MAPS:
        problems.append(f"la feature_map = {s['feature_map']!r}: fla's LinearAttention "
                        f"model has {list(_LA_FEATURE_MAPS)} of ours")
    del out["use_short_conv"], out["conv_size"]     # not LinearAttentionConfig fields
    out.update(expand_k=H * K / d, expand_v=H * K / d, feature_map=s["feature_map"])


# fla's NSA (fla.layers.nsa.NativeSparseAttention): our `nsa` with these settings; the block
# sizes, the number of selected blocks and the window come from the config.
_FLA_NSA = dict(selection="token", compress="mean", shared_kv=True, short_conv=False)


def _nsa_config(c: Mapping[str, Any], require) -> ModelConfig:
    """The ModelConfig of an fla NSAConfig (with its defaults filled in)."""
    require("qkv_bias", (False,))
    require("attn", (None,))
    for field in ("block_size", "block_counts", "window_size"):
        if not isinstance(c[field], int) or isinstance(c[field], bool):
            raise ConversionError(f"fla config (nsa): {field} = {c[field]!r} must be an int")
    bs, d = c["block_size"], c["hidden_size"]
    settings = dict(_FLA_NSA, num_kv_heads=c["num_kv_heads"], rope_base=float(c["rope_theta"]),
                    cmp_block=bs, cmp_stride=bs, sel_block=bs, sel_blocks=c["block_counts"],
                    window=c["window_size"])
    mixers = {"nsa": settings,
              "swiglu": {"d_ff": fla_mlp_width(d, c["hidden_ratio"], c["intermediate_size"])}}
    return ModelConfig(vocab_size=c["vocab_size"], d_model=d, num_layers=c["num_hidden_layers"],
                       num_heads=c["num_heads"], head_dim=c["head_dim"], pattern=("nsa",),
                       channel_pattern=("swiglu",), mixers=mixers,
                       tie_embeddings=bool(c["tie_word_embeddings"]),
                       norm_eps=float(c["norm_eps"]))


def _nsa_to_fla(cfg: ModelConfig, s: Mapping[str, Any], problems: list) -> dict:
    """The NSAConfig of a model of `nsa` layers in fla's variant; else ConversionError with
    `problems` (the caller's) and those found here."""
    H, K = s["heads"] or cfg.num_heads, s["head_size"] or cfg.resolved_head_dim
    Hkv = s["num_kv_heads"] or H
    bad = {f: s[f] for f, v in _FLA_NSA.items() if s[f] != v}
    if bad:
        problems.append(f"nsa {bad}: fla's NSA is {_FLA_NSA}")
    if not s["cmp_block"] == s["cmp_stride"] == s["sel_block"]:
        problems.append(f"nsa cmp_block / cmp_stride / sel_block = {s['cmp_block']} / "
                        f"{s['cmp_stride']} / {s['sel_block']}: fla's NSA has one block_size")
    if set(cfg.layer_mixers) != {"nsa"}:
        problems.append(f"token mixers {sorted(set(cfg.layer_mixers))}: fla's NSA model has "
                        f"nsa layers only")
    G = H // Hkv
    if G < 16 or G & (G - 1):
        problems.append(f"nsa heads / num_kv_heads = {G}: fla's NSA needs a power of two >= 16")
    if problems:
        raise ConversionError("export to fla: not expressible in fla's format:\n  "
                              + "\n  ".join(problems))
    return dict(model_type="nsa", architectures=[_ARCHITECTURES["nsa"]],
                hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_heads=H,
                num_kv_heads=Hkv, head_dim=K, qkv_bias=False, block_size=s["sel_block"],
                block_counts=s["sel_blocks"], window_size=s["window"],
                rope_theta=s["rope_base"] or cfg.rope_theta, vocab_size=cfg.vocab_size,
                norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                hidden_act="swish", hidden_ratio=4, intermediate_size=_swiglu_width(cfg))


def config_to_fla(cfg: ModelConfig) -> dict:
    """The fla config.json (a dict) of a ModelConfig that fla's models can express."""
    problems = []
    linear = sorted({m for m in cfg.layer_mixers if m not in _ATTENTION})
    if len(linear) != 1 or linear[0] not in _TYPE_OF:
        raise ConversionError(f"export to fla: the model's token mixers {sorted(set(cfg.layer_mixers))} "
                              f"need exactly one of {sorted(_TYPE_OF)} (plus attn/swa layers)")
    mixer = linear[0]
    model_type = _TYPE_OF[mixer]
    if set(cfg.channel_pattern) != {"swiglu"}:
        problems.append(f"channel_pattern {cfg.channel_pattern}: fla has a SwiGLU MLP in every "
                        f"layer")
    d, H, K = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    s = cfg.settings(mixer)
    if mixer == "nsa":
        return _nsa_to_fla(cfg, s, problems)
    out = dict(model_type=model_type, architectures=[_ARCHITECTURES[model_type]],
               hidden_size=d, num_hidden_layers=cfg.num_layers, num_heads=H,
               vocab_size=cfg.vocab_size, norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, hidden_act="swish", hidden_ratio=4,
               use_short_conv=s["short_conv"], conv_size=s["conv_size"])
    if "swiglu" in cfg.channel_pattern:
        out["intermediate_size"] = _swiglu_width(cfg)
    value_dim = int(round(K * s.get("expand_v", 1.0)))         # la has no expand_v
    if mixer in ("retnet", "la"):
        _retnet_la_to_fla(cfg, mixer, s, out, problems)
    elif mixer == "gdn":
        out.update(head_dim=K, expand_v=s["expand_v"], use_gate=s["use_gate"],
                   allow_neg_eigval=s["allow_neg_eigval"], num_v_heads=s["num_v_heads"])
    elif mixer == "kda":
        lb = s["lower_bound"]
        if not s["gate_bias"]:
            problems.append("kda gate_bias = False: fla's KDA output gate has a bias")
        out.update(head_dim=K, expand_v=s["expand_v"], allow_neg_eigval=s["allow_neg_eigval"],
                   num_v_heads=s["num_v_heads"], lower_bound=lb,
                   safe_gate=lb is not None and -5 <= lb < 0)
    elif mixer == "mom":
        out.update(head_dim=K, **_mom_to_fla(s, problems))
        if set(cfg.layer_mixers) != {"mom"}:
            problems.append("attention layers: fla's MomBlock cannot run them")
    else:
        out.update(expand_k=H * K / d, expand_v=H * value_dim / d)
        if mixer == "deltanet":
            out.update(use_gate=s["use_gate"], allow_neg_eigval=s["allow_neg_eigval"])
            if s["num_v_heads"] is not None:
                problems.append("deltanet num_v_heads: fla's DeltaNet has no grouped value heads")
        else:
            if (s["gate_rank"], s["gate_normalizer"]) != (_GLA_GATE_RANK, _GLA_GATE_NORMALIZER):
                problems.append(f"gla gate_rank / gate_normalizer = {s['gate_rank']} / "
                                f"{s['gate_normalizer']}: fla's GLA model fixes them at "
                                f"{_GLA_GATE_RANK} / {_GLA_GATE_NORMALIZER}")
    specs = []
    for name in _ATTENTION:
        layers = [i for i, m in enumerate(cfg.layer_mixers) if m == name]
        if not layers:
            continue
        a = cfg.settings(name)
        heads = a["heads"] or H
        if (a["head_size"] or K) * heads != d:
            problems.append(f"{name}: fla's attention has head_dim = hidden_size / num_heads "
                            f"= {d / heads}, this model {a['head_size'] or K}")
        if a["sinks"] or a["short_conv"]:
            problems.append(f"{name}: sinks and short convs have no fla counterpart")
        spec = dict(layers=layers, num_heads=heads, num_kv_heads=a["num_kv_heads"] or heads,
                    qkv_bias=a["qkv_bias"], window_size=a.get("window"),
                    rope_theta=a["rope_base"] or cfg.rope_theta)
        specs.append(spec)
    out["attn"] = None if not specs else specs[0] if len(specs) == 1 else specs
    if problems:
        raise ConversionError("export to fla: not expressible in fla's format:\n  "
                              + "\n  ".join(problems))
    return out


def _swiglu_width(cfg: ModelConfig) -> int:
    from mem_lm.model import make_mixer
    return make_mixer(cfg, "swiglu").d_ff


# ------------------------------------------------------------------------------ tensors
def _mom_entries(cfg: ModelConfig) -> list:
    """`_mixer_entries` of fla's MomAttention. Its per-memory Linears `{k,v,b,a}_proj.{m}` are
    named here by one joined tensor `{k,v,b,a}_proj.weight` (the memories' [out, in] weights
    stacked along out, which is our [in, memory, out...] kernel as a Linear):
    `_join_memories` and `_split_memories` convert."""
    D1 = ("dense", 1)
    s = cfg.settings("mom")
    out = [("gate.weight", ("router", "kernel"), D1), ("q_proj.weight", ("q_proj", "kernel"), D1)]
    out += [(f"{n}_proj.weight", (f"{n}_proj", "kernel"), D1) for n in "kvba"]
    if s["shared_memory"]:
        out += [(f"shared_{n}.weight", (f"shared_{n}_proj", "kernel"), D1) for n in "kvba"]
    out += [("A_log", ("A_log",), "flat"), ("dt_bias", ("dt_bias",), "flat")]
    out += [(f"{n}_conv1d.weight", (f"{n}_conv", "kernel"), "conv") for n in "qkv"]
    return out + [("g_proj.weight", ("g_proj", "kernel"), D1),
                  ("o_norm.weight", ("o_norm", "scale"), "flat"),
                  ("o_proj.weight", ("o_proj", "kernel"), ("dense", 2))]


def _kda_entries(cfg: ModelConfig) -> list:
    """`_mixer_entries` of fla's KimiDeltaAttention: its low-rank decay `f_proj` (0: d_model ->
    value head width, 1: -> Hv·K) and output gate `g_proj` (the same ranks, 1 with a bias),
    A_log [Hv], dt_bias [Hv·K]."""
    D1 = ("dense", 1)
    out = [(f"{n}_proj.weight", (f"{n}_proj", "kernel"), D1) for n in "qkv"]
    if cfg.settings("kda")["short_conv"]:
        out += [(f"{n}_conv1d.weight", (f"{n}_conv", "kernel"), "conv") for n in "qkv"]
    return out + [("b_proj.weight", ("b_proj", "kernel"), D1),
                  ("f_proj.0.weight", ("gk_proj_a", "kernel"), D1),
                  ("f_proj.1.weight", ("gk_proj_b", "kernel"), D1),
                  ("A_log", ("A_log",), "flat"), ("dt_bias", ("dt_bias",), "flat"),
                  ("g_proj.0.weight", ("g_proj_a", "kernel"), D1),
                  ("g_proj.1.weight", ("g_proj_b", "kernel"), D1),
                  ("g_proj.1.bias", ("g_proj_b", "bias"), "flat"),
                  ("o_norm.weight", ("o_norm", "scale"), "flat"),
                  ("o_proj.weight", ("o_proj", "kernel"), ("dense", 2))]


_MEMORY_PROJ = re.compile(r"^(model\.layers\.\d+\.attn\.[kvba]_proj)\.(\d+)\.weight$")
_JOINED_PROJ = re.compile(r"^(model\.layers\.\d+\.attn\.[kvba]_proj)\.weight$")


def _join_memories(tensors: Mapping[str, np.ndarray], num_memories: int) -> dict:
    """fla's per-memory `...attn.{k,v,b,a}_proj.{m}.weight` [out, in] as one
    `...attn.{k,v,b,a}_proj.weight` [M · out, in] each (memory m's rows m · out ...)."""
    out, parts = {}, {}
    for name, w in tensors.items():
        match = _MEMORY_PROJ.match(name)
        if match:
            parts.setdefault(match[1], {})[int(match[2])] = w
        else:
            out[name] = w
    for prefix, ws in parts.items():
        if sorted(ws) != list(range(num_memories)):
            raise ConversionError(f"fla checkpoint: {prefix}.* has memories {sorted(ws)}, the "
                                  f"config num_memories = {num_memories}")
        out[prefix + ".weight"] = np.concatenate([ws[m] for m in range(num_memories)])
    return out


def _split_memories(tensors: Mapping[str, np.ndarray], num_memories: int) -> dict:
    """The inverse of `_join_memories`."""
    out = {}
    for name, w in tensors.items():
        match = _JOINED_PROJ.match(name)
        if match:
            for m, part in enumerate(np.split(w, num_memories)):
                out[f"{match[1]}.{m}.weight"] = np.ascontiguousarray(part)
        else:
            out[name] = w
    return out


def _retnet_la_entries(name: str) -> list:
    """`_mixer_entries` of fla's MultiScaleRetention (its fused gated norm) and
    LinearAttention (an ungated per-head RMSNorm `norm`)."""
    out = [(f"{n}_proj.weight", (f"{n}_proj", "kernel"), ("dense", 1)) for n in "qkv"]
    if name == "retnet":
        out += [("g_proj.weight", ("g_proj", "kernel"), ("dense", 1)),
                ("g_norm_swish_gate.weight", ("o_norm", "scale"), "flat")]
    else:
        out.append(("norm.weight", ("o_norm", "scale"), "flat"))
    return out + [("o_proj.weight", ("o_proj", "kernel"), ("dense", 2))]


def _mixer_entries(cfg: ModelConfig, name: str) -> list:
    """(fla name under `attn.`, our path under `mixer`, how) of one token mixer."""
    D1, D2 = ("dense", 1), ("dense", 2)
    if name == "mom":
        return _mom_entries(cfg)
    if name == "kda":
        return _kda_entries(cfg)
    if name in ("retnet", "la"):
        return _retnet_la_entries(name)
    if name == "nsa":   # fla's NativeSparseAttention: one k / v ([d, 1, Hkv, D] here), gates
        return [(f"{n}_proj.weight", (f"{n}_proj", "kernel"), D1) for n in "qkvg"] + [
            ("o_proj.weight", ("o_proj", "kernel"), D2)]
    if name in _ATTENTION:
        s = cfg.settings(name)
        out = [(f"{n}_proj.weight", (f"{n}_proj", "kernel"), D1) for n in "qkv"]
        if s["qkv_bias"]:
            out += [(f"{n}_proj.bias", (f"{n}_proj", "bias"), "flat") for n in "qkv"]
        return out + [("o_proj.weight", ("o_proj", "kernel"), D2)]
    s = cfg.settings(name)
    out = [(f"{n}_proj.weight", (f"{n}_proj", "kernel"), D1) for n in "qkv"]
    if s["short_conv"]:
        out += [(f"{n}_conv1d.weight", (f"{n}_conv", "kernel"), "conv") for n in "qkv"]
    if name == "gla":
        out += [("gk_proj.0.weight", ("gk_proj_a", "kernel"), D1),
                ("gk_proj.1.weight", ("gk_proj_b", "kernel"), D1),
                ("gk_proj.1.bias", ("gk_proj_b", "bias"), "flat"),
                ("g_proj.weight", ("g_proj", "kernel"), D1),
                ("g_norm_swish_gate.weight", ("o_norm", "scale"), "flat")]
    else:
        out.append(("b_proj.weight", ("b_proj", "kernel"), D1))
        if name == "gdn":
            out += [("a_proj.weight", ("a_proj", "kernel"), D1),
                    ("A_log", ("A_log",), "flat"), ("dt_bias", ("dt_bias",), "flat")]
        if s["use_gate"]:
            out.append(("g_proj.weight", ("g_proj", "kernel"), D1))
        out.append(("o_norm.weight", ("o_norm", "scale"), "flat"))
    return out + [("o_proj.weight", ("o_proj", "kernel"), D2)]


def tensor_map(cfg: ModelConfig) -> list:
    """[(fla tensor name, our param path (a tuple of keys, without scan_layers), how)] for
    every parameter of the model."""
    D1 = ("dense", 1)
    out = [("model.embeddings.weight", ("embed", "embedding"), "same"),
           ("model.norm.weight", ("final_norm", "scale"), "flat")]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), D1))
    for i in range(cfg.num_layers):
        token, channel = cfg.layer_kinds(i)
        pre, ours = f"model.layers.{i}.", f"layer_{i}"
        out.append((pre + "attn_norm.weight", (ours, "mixer_norm", "scale"), "flat"))
        out += [(pre + "attn." + f, (ours, "mixer") + p, how)
                for f, p, how in _mixer_entries(cfg, token)]
        if channel == "swiglu":
            out += [(pre + "mlp_norm.weight", (ours, "mlp_norm", "scale"), "flat"),
                    (pre + "mlp.gate_proj.weight", (ours, "mlp", "w_gate", "kernel"), D1),
                    (pre + "mlp.up_proj.weight", (ours, "mlp", "w_up", "kernel"), D1),
                    (pre + "mlp.down_proj.weight", (ours, "mlp", "w_out", "kernel"), D1)]
    return out


# ------------------------------------------------------------------------------ files
def read_fla(path: str) -> tuple[dict, dict]:
    """(config.json as a dict, {tensor name: NumPy array}) of an fla checkpoint directory."""
    return read_hf_dir(path, "fla")


def import_fla(path: str, lazy: bool = False) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of an fla checkpoint directory; params a plain nested dict of
    float32 NumPy arrays, as `LanguageModel(cfg).apply({"params": params}, tokens)` takes, or
    with `lazy` `LazyParam`s in the checkpoint's dtype (see `import_hf`)."""
    config, tensors = read_fla(path)
    cfg = config_from_fla(config)
    if config.get("model_type") == "mom":
        tensors = _join_memories(tensors, cfg.settings("mom")["num_memories"])
    if config.get("model_type") in ("gla", "retnet") and not config.get("fuse_norm", True):
        # Unfused, fla's GLA and RetNet name their output norm g_norm and apply the same SiLU
        # gate after it.
        tensors = {n.replace(".attn.g_norm.", ".attn.g_norm_swish_gate."): w
                   for n, w in tensors.items()}
    return cfg, params_from_fla(cfg, tensors, lazy)


def params_from_fla(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                    lazy: bool = False) -> dict:
    entries = [(name, (path,), how) for name, path, how in tensor_map(cfg)]
    return params_from_tensors(cfg, tensors, entries, "fla", "model.embeddings.weight", lazy)


def export_fla(cfg: ModelConfig, params: Mapping, path: str) -> None:
    """Write `cfg` and `params` (with or without scan_layers) as an fla checkpoint directory
    (config.json + model.safetensors, float32) that `fla.models.AutoModelForCausalLM`
    and `import_fla` load."""
    from safetensors.numpy import save_file

    fla_cfg = config_to_fla(cfg)
    get = layer_params(cfg, params)
    shapes = param_shapes(cfg)
    entries = tensor_map(cfg)
    unmapped = sorted(set(shapes) - {p for _, p, _ in entries})
    if unmapped:
        raise ConversionError(f"export to fla: parameters with no fla name: {unmapped}")
    tensors = {n: np.ascontiguousarray(to_torch(how, get(p).astype(np.float32)))
               for n, p, how in entries}
    if fla_cfg["model_type"] == "mom":
        tensors = _split_memories(tensors, fla_cfg["num_memories"])
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fla_cfg, f, indent=2, sort_keys=True)
