"""Checkpoints in and out of other libraries' formats, one module per format:

    fla    flash-linear-attention's Hugging Face checkpoints (mem_lm/convert/fla.py)
    hf     Hugging Face transformers' own models: Mamba2ForCausalLM, Qwen3NextForCausalLM,
           KimiLinearForCausalLM (mem_lm/convert/hf.py)

and what they share in mem_lm/convert/common.py. The command line:

    python -m mem_lm.convert --from FORMAT PATH --out WORKDIR   # a workdir load_pretrained reads
    python -m mem_lm.convert --to FORMAT WORKDIR --out PATH
"""
from __future__ import annotations

import argparse
import os
import sys

from mem_lm.convert.common import ConversionError, param_shapes, save_workdir
from mem_lm.convert.fla import (config_from_fla, config_to_fla, export_fla, fla_mlp_width,
                                import_fla, params_from_fla, read_fla, tensor_map)
from mem_lm.convert.hf import config_from_hf, config_to_hf, export_hf, import_hf, read_hf

__all__ = ["ConversionError", "config_from_fla", "config_from_hf", "config_to_fla",
           "config_to_hf", "export_fla", "export_hf", "fla_mlp_width", "import_fla",
           "import_hf", "main", "param_shapes", "params_from_fla", "read_fla", "read_hf",
           "save_workdir", "tensor_map"]

# FORMAT -> (import: path -> (cfg, params), export: (cfg, params, path) -> None, what --from
# reads / --to writes).
FORMATS = {
    "fla": (import_fla, export_fla, "fla's Hugging Face checkpoint directory "
                                    "(config.json + model.safetensors)"),
    "hf": (import_hf, export_hf, "a Hugging Face transformers checkpoint directory "
                                 "(config.json + safetensors) of Mamba2ForCausalLM, "
                                 "Qwen3NextForCausalLM or KimiLinearForCausalLM"),
}


def main(argv=None) -> int:
    formats = ", ".join(f"{k}: {v[2]}" for k, v in FORMATS.items())
    p = argparse.ArgumentParser(
        prog="python -m mem_lm.convert",
        description=f"Convert between other libraries' checkpoints and mem_lm workdirs. "
                    f"Formats: {formats}.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="src", metavar=("FORMAT", "PATH"), nargs=2,
                     help="import: --from FORMAT DIR")
    way.add_argument("--to", dest="dst", metavar=("FORMAT", "PATH"), nargs=2,
                     help="export: --to FORMAT WORKDIR (a training workdir or checkpoint)")
    p.add_argument("--out", required=True, help="the workdir (import) or directory (export)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="import: store the parameters in this dtype (default: the "
                        "checkpoint's own, e.g. a bf16 release stays bf16 on disk)")
    a = p.parse_args(argv)
    fmt, path = a.src or a.dst
    if fmt not in FORMATS:
        p.error(f"format {fmt!r}: supported: {sorted(FORMATS)}")
    import_fn, export_fn, _ = FORMATS[fmt]
    import jax.numpy as jnp
    try:
        if a.src:
            # Lazy: each parameter is read from the checkpoint when it is written, so that
            # host memory holds one at a time, never the model.
            cfg, params = import_fn(path, lazy=True)
            dtype = None if a.dtype is None else jnp.dtype(a.dtype)
            step = save_workdir(cfg, params, a.out, {"format": fmt,
                                                     "path": os.path.abspath(path)}, dtype)
            print(f"imported {path} -> {step}\n  pattern {cfg.pattern}, {cfg.num_layers} "
                  f"layers, d_model {cfg.d_model}; load with "
                  f"mem_lm.load_pretrained({a.out!r}); continue training with\n  "
                  f"python -m train --config {os.path.join(a.out, 'train_config.py')} "
                  f"--workdir NEW_WORKDIR")
        else:
            import jax

            from mem_lm.pretrained import load_pretrained
            model, variables = load_pretrained(path)
            export_fn(model.config, jax.device_get(variables["params"]), a.out)
            print(f"exported {path} -> {a.out} (config.json, model.safetensors)")
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
