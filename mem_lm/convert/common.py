"""What every outside format's converter shares: the error type, PyTorch <-> Flax tensor
layouts, our parameter shapes and paths, reading a Hugging Face checkpoint directory
(config.json + safetensors, through the `safetensors` package's NumPy API: no torch), and
writing the workdir that `load_pretrained` and `python -m train` read."""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Mapping, NamedTuple

import numpy as np

from mem_lm.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message lists what and why."""


def shortest_period(seq: tuple) -> tuple:
    """The shortest prefix that repeated gives `seq` (a layer list -> our `pattern`)."""
    n = len(seq)
    for p in range(1, n + 1):
        if n % p == 0 and seq == seq[:p] * (n // p):
            return seq[:p]
    return seq


# ------------------------------------------------------------------------------ tensors
# How a tensor changes between PyTorch and here: ("dense", n) for a Linear weight
# [out, in] <-> a kernel [in (n axes)..., out...]; "conv" for a depthwise Conv1d weight
# [C, 1, W] <-> [W, heads, width]; "flat" for a vector <-> any shape of as many values;
# "same" for an identical array. ("dense", n, rows): a fused Linear whose rows interleave its
# parts (Qwen3-Next's in_proj_qkvz, per key head [q | k | v | z]): `rows` is the order that
# takes its rows to its parts stacked one after the other (w[rows]), the layout below.
class Stacked(NamedTuple):
    """One slice, [index], of a parameter stacked over its first axis (an expert of a MoE's
    [E, ...] kernels), where the checkpoint keeps a tensor per slice."""
    path: tuple
    index: int


def part_path(part) -> tuple:
    return part.path if isinstance(part, Stacked) else part


def part_shape(shapes: Mapping, part) -> tuple:
    return shapes[part.path][1:] if isinstance(part, Stacked) else shapes[part]


def row_order(how):
    """The row order of a fused tensor's parts (None: stacked one after the other)."""
    return how[2] if isinstance(how, tuple) and len(how) > 2 else None


def to_ours(how, w: np.ndarray, shape: tuple) -> np.ndarray:
    if how == "conv":
        return w[:, 0, :].T.reshape(shape)
    if how in ("flat", "same"):
        return w.reshape(shape)
    return w.T.reshape(shape)


def to_torch(how, a: np.ndarray) -> np.ndarray:
    if how == "conv":
        return a.reshape(a.shape[0], -1).T[:, None, :]
    if how == "flat":
        return a.reshape(-1)
    if how == "same":
        return a
    n_in = how[1]
    return a.reshape(math.prod(a.shape[:n_in]), -1).T


def torch_shape(how, shape: tuple) -> tuple:
    """The shape PyTorch stores a parameter of our `shape` in."""
    if how == "conv":
        return (math.prod(shape[1:]), 1, shape[0])
    if how == "flat":
        return (math.prod(shape),)
    if how == "same":
        return tuple(shape)
    return (math.prod(shape[how[1]:]), math.prod(shape[:how[1]]))


def param_shapes(cfg: ModelConfig) -> dict:
    """{path: shape} of the model's parameters (per layer, as without scan_layers)."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mem_lm.model import LanguageModel
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    shapes = jax.eval_shape(LanguageModel(flat_cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32))
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shapes["params"]))
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def set_path(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def params_from_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], entries: list,
                        fmt: str, embedding: str) -> dict:
    """Our params from a checkpoint's `tensors` (any mapping: a lazy one reads each tensor when
    it is taken, once), checked against `entries` (the format's tensor map: (tensor name, our
    parts, layout); a part is a path or a `Stacked` slice of one; a tensor of several parts
    holds them stacked by rows, in order, or in `row_order(layout)`). `fmt` names the format in
    errors, `embedding` is its
    input embedding's tensor (a tied `lm_head.weight` must equal it). Every tensor mapped,
    every parameter filled, floats of the expected shapes: else a ConversionError listing all
    that is wrong."""
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        # Some writers keep the tied copy; it carries nothing only if it is the embedding.
        head, emb = tensors["lm_head.weight"], tensors.get(embedding)
        if emb is None or head.shape != emb.shape or head.tobytes() != emb.tobytes():
            raise ConversionError(f"{fmt} checkpoint: tie_word_embeddings is true but "
                                  f"lm_head.weight differs from {embedding}")
        tensors = {n: w for n, w in tensors.items() if n != "lm_head.weight"}
    shapes = param_shapes(cfg)
    names = {n for n, _, _ in entries}
    missing = [n for n, _, _ in entries if n not in tensors]
    leftover = sorted(n for n in tensors if n not in names)
    if missing or leftover:
        raise ConversionError(
            f"{fmt} checkpoint does not match its config:"
            + (f"\n  missing tensors: {missing}" if missing else "")
            + (f"\n  tensors left over (not mapped to any parameter): {leftover}"
               if leftover else ""))
    params, wrong, stacked = {}, [], {}
    for name, parts, how in entries:
        w = np.asarray(tensors[name])
        if not np.issubdtype(w.dtype, np.floating) and w.dtype.name != "bfloat16":
            wrong.append(f"{name}: dtype {w.dtype}")
            continue
        rows = [torch_shape(how, part_shape(shapes, p))[0] for p in parts]
        want = (sum(rows),) + torch_shape(how, part_shape(shapes, parts[0]))[1:]
        if tuple(w.shape) != want:
            wrong.append(f"{name}: shape {tuple(w.shape)}, expected {want} for "
                         + ", ".join(f"{'/'.join(part_path(p))} {part_shape(shapes, p)}"
                                     for p in parts))
            continue
        if row_order(how) is not None:
            w = w[row_order(how)]
        for p, start, n in zip(parts, np.cumsum([0] + rows), rows):
            a = to_ours(how, w[start:start + n].astype(np.float32), part_shape(shapes, p))
            if isinstance(p, Stacked):
                if p.path not in stacked:
                    stacked[p.path] = np.zeros(shapes[p.path], np.float32)
                    set_path(params, p.path, stacked[p.path])
                stacked[p.path][p.index] = a
            else:
                set_path(params, p, a)
    unmapped = sorted(set(shapes) - {part_path(p) for _, ps, _ in entries for p in ps})
    if wrong or unmapped:
        raise ConversionError(f"{fmt} checkpoint: " + "; ".join(wrong)
                              + (f"; parameters with no {fmt} tensor: {unmapped}"
                                 if unmapped else ""))
    return params


def tensors_from_params(cfg: ModelConfig, params: Mapping, entries: list, fmt: str) -> dict:
    """The checkpoint's {tensor name: float32 array} of our params (with or without
    scan_layers) by the format's tensor map (the inverse of `params_from_tensors`)."""
    get = layer_params(cfg, params)
    unmapped = sorted(set(param_shapes(cfg))
                      - {part_path(p) for _, ps, _ in entries for p in ps})
    if unmapped:
        raise ConversionError(f"export to {fmt}: parameters with no {fmt} name: {unmapped}")

    def torch_part(how, p):
        a = get(part_path(p)).astype(np.float32)
        return to_torch(how, a[p.index] if isinstance(p, Stacked) else a)

    out = {}
    for name, parts, how in entries:
        w = np.concatenate([torch_part(how, p) for p in parts], axis=0)
        if row_order(how) is not None:
            w = w[np.argsort(row_order(how))]
        out[name] = np.ascontiguousarray(w)
    return out


def layer_params(cfg: ModelConfig, params: Mapping) -> Callable[[tuple], np.ndarray]:
    """A getter of our per-layer paths (layer_{i}/...) for params with or without scan_layers."""
    def get(path):
        if cfg.scan_layers and path[0].startswith("layer_"):
            i = int(path[0][len("layer_"):])
            g, j = divmod(i, cfg.group_size)
            node = params["groups"][f"block_{j}"]
            for k in path[1:]:
                node = node[k]
            return np.asarray(node)[g]
        node = params
        for k in path:
            node = node[k]
        return np.asarray(node)
    return get


# ------------------------------------------------------------------------------ files
class SafetensorsDir(Mapping):
    """{tensor name: NumPy array} over a checkpoint's safetensors files that reads a tensor
    only when it is taken (`safe_open`, memory-mapped), so that a checkpoint larger than host
    memory is never read whole: a converter takes each tensor once, converts it and lets it
    go. `skip(name)` hides tensors (a release's extra heads)."""

    def __init__(self, files: list, skip=None):
        from safetensors import safe_open
        self._files = {f: safe_open(f, framework="numpy") for f in files}
        self._where = {n: f for f, h in self._files.items() for n in h.keys()
                       if skip is None or not skip(n)}

    def without(self, skip) -> "SafetensorsDir":
        """This view without the tensors `skip(name)` names."""
        view = object.__new__(SafetensorsDir)
        view._files = self._files
        view._where = {n: f for n, f in self._where.items() if not skip(n)}
        return view

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[self._where[name]].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where


def read_hf_dir(path: str, what: str) -> tuple[dict, "SafetensorsDir"]:
    """(config.json as a dict, {tensor name: NumPy array}) of a Hugging Face checkpoint
    directory (model.safetensors, or shards listed in model.safetensors.index.json); the
    tensors are a `SafetensorsDir`, read one at a time when taken; `what` names the format in
    errors."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (an {what} checkpoint directory holds "
                                f"config.json and model.safetensors)")
    with open(cfg_file) as f:
        config = json.load(f)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors checkpoints are read; save with "
                                f"save_pretrained(..., safe_serialization=True))")
    return config, SafetensorsDir(files)


_TRAIN_CONFIG = '''"""Continued training of {source} (written by python -m mem_lm.convert):

    python -m train --config {path} --workdir NEW_WORKDIR [--config.data.tokenizer=...]

The model is the imported one; its parameters start the run (train.init_from). The data,
optimizer and schedule are configs/base.py's: set them for the run.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_config(**{model})
    c.train.init_from = {workdir!r}
    return c
'''


def save_workdir(cfg: ModelConfig, params: Mapping, workdir: str, source: dict) -> str:
    """A checkpoint step directory <workdir>/checkpoints/0 with the items `load_pretrained`
    reads (params, meta), and <workdir>/train_config.py, an experiment config that continues
    training from it; returns the step directory."""
    import pprint

    import orbax.checkpoint as ocp

    from mem_lm.pretrained import META_ITEM, PARAMS_ITEM
    workdir = os.path.abspath(workdir)
    step = os.path.join(workdir, "checkpoints", "0")
    if os.path.exists(step):
        raise FileExistsError(f"{step} exists; choose a new --out")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(step, PARAMS_ITEM), params)
    os.makedirs(os.path.join(step, META_ITEM))
    with open(os.path.join(step, META_ITEM, "meta.json"), "w") as f:
        json.dump({"model_config": cfg.to_dict(), "source": source}, f, indent=2)
    path = os.path.join(workdir, "train_config.py")
    with open(path, "w") as f:
        f.write(_TRAIN_CONFIG.format(source=source.get("path", "a checkpoint"), path=path,
                                     model=pprint.pformat(cfg.to_dict(), indent=4),
                                     workdir=workdir))
    return step
