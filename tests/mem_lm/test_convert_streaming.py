"""`python -m mem_lm.convert --from` never holds the model in host memory: the workdir's
checkpoint is written one parameter at a time, each read from the safetensors files when it is
written (common.LazyParam, save_workdir), and the checkpoint's dtype is kept on disk."""
import json
import os
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from mem_lm import load_pretrained
from mem_lm.convert import config_from_hf, config_to_hf, import_hf, main, param_shapes
from mem_lm.convert.common import Stacked, part_shape, torch_shape
from mem_lm.convert.hf import tensor_map

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")


def write_checkpoint(path):
    """A random bf16 Kimi Linear checkpoint of ~40 MB whose largest tensor is 2 MB (the
    fixture's layer kinds, wider and deeper); returns its total bytes and largest param's."""
    with open(os.path.join(FIXTURES, "kimi_linear", "config.json")) as f:
        c = json.load(f)
    cfg = config_from_hf({**c, "vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 12,
                          "intermediate_size": 512, "moe_intermediate_size": 128,
                          "num_experts": 16, "layer_types": None, "mlp_layer_types": None,
                          "linear_attn_config": {**c["linear_attn_config"], "kda_layers":
                                                 [1, 2, 4, 5, 6, 8, 9, 10, 12],
                                                 "full_attn_layers": [3, 7, 11]}})
    shapes, rng = param_shapes(cfg), np.random.default_rng(0)
    tensors = {}
    for name, parts, how in tensor_map(cfg):
        rows = sum(torch_shape(how, part_shape(shapes, p))[0] for p in parts)
        shape = (rows,) + torch_shape(how, part_shape(shapes, parts[0]))[1:]
        tensors[name] = (rng.standard_normal(shape, np.float32) * 0.1).astype(ml_dtypes.bfloat16)
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f)
    largest = max(np.prod(s) for p, s in shapes.items()) * 2
    return sum(w.nbytes for w in tensors.values()), largest


@pytest.mark.slow
def test_import_holds_one_parameter_at_a_time_and_keeps_bf16(tmp_path):
    """~12 s: a 42 MiB bf16 checkpoint converted by the command line under tracemalloc (peak
    12.0 MiB measured, most of it tracing the model's shapes; the import before this held the
    whole model in float32, 85 MiB), then read back by load_pretrained."""
    src, out = str(tmp_path / "hf"), str(tmp_path / "workdir")
    total, largest = write_checkpoint(src)
    assert total > 15 * largest
    tracemalloc.start()
    try:
        assert main(["--from", "hf", src, "--out", out]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python-side peak (NumPy buffers, the safetensors reads, the bookkeeping): a few
    # parameters and the shape tracing, far below the model.
    assert peak < total / 3, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.1f} MiB model"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.join(out, "checkpoints", "0", "params"))
    assert {str(a.dtype) for a in jax.tree.leaves(meta.item_metadata.tree)} == {"bfloat16"}
    # What load_pretrained restores (float32) is the checkpoint's values.
    _, variables = load_pretrained(out)
    cfg, want = import_hf(src)
    got = jax.tree.map(np.asarray, variables["params"])
    jax.tree.map(np.testing.assert_array_equal, got, want)
