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
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from mem_lm.config import ModelConfig
from mem_lm.convert.common import (ConversionError, layer_params, param_shapes,
                                   params_from_tensors, read_hf_dir, to_torch)

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
}
# transformers 5.24's Mamba2Config defaults, for fields a config.json may omit.
_DEFAULTS = {
    "mamba2": dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096,
                   state_size=128, num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2,
                   conv_kernel=4, n_groups=8, use_bias=False, use_conv_bias=True,
                   hidden_act="silu", time_step_limit=(0.0, math.inf),
                   tie_word_embeddings=False),
}
_ARCHITECTURES = {"mamba2": "Mamba2ForCausalLM"}
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
    require("use_bias", not c["use_bias"], "false: in_proj and out_proj without biases")
    limit = tuple(_float(v) for v in c["time_step_limit"])
    require("time_step_limit", limit == (0.0, math.inf),
            "(0.0, inf): dt is not clamped (transformers' one-token path ignores the limit)")
    d, H, P = c["hidden_size"], c["num_heads"], c["head_dim"]
    if d * c["expand"] != H * P:
        raise ConversionError(f"hf config ({model_type}): hidden_size · expand = "
                              f"{d * c['expand']} must equal num_heads · head_dim = {H * P}")
    ssd = dict(d_state=c["state_size"], ngroups=c["n_groups"], conv_size=c["conv_kernel"],
               short_conv=True)
    try:
        return ModelConfig(vocab_size=c["vocab_size"], d_model=d,
                           num_layers=c["num_hidden_layers"], num_heads=H, head_dim=P,
                           pattern=("ssd",), channel_pattern=("none",), mixers={"ssd": ssd},
                           tie_embeddings=bool(c["tie_word_embeddings"]),
                           norm_eps=float(c["layer_norm_epsilon"]))
    except ValueError as e:
        raise ConversionError(f"hf config ({model_type}): {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    """The transformers config.json (a dict) of a ModelConfig that Mamba2ForCausalLM can
    express."""
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


# ------------------------------------------------------------------------------ tensors
def tensor_map(cfg: ModelConfig) -> list:
    """[(hf tensor name, [our param path (a tuple of keys, without scan_layers), ...], how)]:
    each tensor is its parts' PyTorch forms concatenated along its first axis."""
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


# ------------------------------------------------------------------------------ files
def read_hf(path: str) -> tuple[dict, dict]:
    """(config.json as a dict, {tensor name: NumPy array}) of a transformers checkpoint
    directory."""
    return read_hf_dir(path, "hf")


def import_hf(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a transformers checkpoint directory; params a plain nested dict
    of float32 NumPy arrays, as `LanguageModel(cfg).apply({"params": params}, tokens)` takes."""
    config, tensors = read_hf(path)
    cfg = config_from_hf(config)
    c = dict(_DEFAULTS[config["model_type"]], **config)
    tensors = dict(tensors)
    if "backbone.embedding.weight" in tensors:   # the original checkpoints' name
        tensors.setdefault("backbone.embeddings.weight", tensors.pop("backbone.embedding.weight"))
    if not c["use_conv_bias"]:                   # no bias: a zero one computes the same
        for i in range(cfg.num_layers):
            w = tensors.get(f"backbone.layers.{i}.mixer.conv1d.weight")
            if w is not None:
                tensors.setdefault(f"backbone.layers.{i}.mixer.conv1d.bias",
                                   np.zeros(w.shape[0], np.float32))
    return cfg, params_from_hf(cfg, tensors)


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    return params_from_tensors(cfg, tensors, tensor_map(cfg), "hf", "backbone.embeddings.weight")


def export_hf(cfg: ModelConfig, params: Mapping, path: str) -> None:
    """Write `cfg` and `params` (with or without scan_layers) as a transformers checkpoint
    directory (config.json + model.safetensors, float32) that `Mamba2ForCausalLM` and
    `import_hf` load."""
    from safetensors.numpy import save_file

    hf_cfg = config_to_hf(cfg)
    get = layer_params(cfg, params)
    shapes = param_shapes(cfg)
    entries = tensor_map(cfg)
    unmapped = sorted(set(shapes) - {p for _, ps, _ in entries for p in ps})
    if unmapped:
        raise ConversionError(f"export to hf: parameters with no hf name: {unmapped}")
    tensors = {n: np.ascontiguousarray(np.concatenate(
        [to_torch(how, get(p).astype(np.float32)) for p in paths], axis=0))
        for n, paths, how in entries}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
