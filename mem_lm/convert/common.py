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
# ("shaped", torch shape) the same with PyTorch's own shape (-1: all our values), for a
# parameter kept with unit axes for broadcasting (Kimi Linear's A_log [1, 1, H, 1]);
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


def _shaped(how) -> bool:
    return isinstance(how, tuple) and how[0] == "shaped"


def to_ours(how, w: np.ndarray, shape: tuple) -> np.ndarray:
    if how == "conv":
        return w[:, 0, :].T.reshape(shape)
    if how in ("flat", "same") or _shaped(how):
        return w.reshape(shape)
    return w.T.reshape(shape)


def to_torch(how, a: np.ndarray) -> np.ndarray:
    if how == "conv":
        return a.reshape(a.shape[0], -1).T[:, None, :]
    if how == "flat":
        return a.reshape(-1)
    if how == "same":
        return a
    if _shaped(how):
        return a.reshape(how[1])
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
    if _shaped(how):
        return tuple(math.prod(shape) if n == -1 else n for n in how[1])
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


class LazyParam:
    """A parameter not read yet: its `shape`, its checkpoint's `dtype`, and `load()`, which
    reads its tensors (one, its rows of a fused one, or a stacked parameter's slices), converts
    them to our layout and returns the array in that dtype. `save_workdir` writes these one at
    a time, so that an import never holds more than a parameter or two in host memory."""
    __slots__ = ("shape", "dtype", "load")

    def __init__(self, shape: tuple, dtype, load: Callable[[], np.ndarray]):
        self.shape, self.dtype, self.load = tuple(shape), np.dtype(dtype), load

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def tensor_meta(tensors: Mapping, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a checkpoint tensor, from the file header where the mapping has one
    (`SafetensorsDir`, `RenamedTensors`: nothing is read)."""
    if hasattr(tensors, "meta"):
        return tensors.meta(name)
    w = np.asarray(tensors[name])
    return tuple(w.shape), w.dtype


def params_from_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], entries: list,
                        fmt: str, embedding: str, lazy: bool = False) -> dict:
    """Our params from a checkpoint's `tensors` (any mapping: a lazy one reads each tensor when
    it is taken), checked against `entries` (the format's tensor map: (tensor name, our
    parts, layout); a part is a path or a `Stacked` slice of one; a tensor of several parts
    holds them stacked by rows, in order, or in `row_order(layout)`). `fmt` names the format in
    errors, `embedding` is its input embedding's tensor (a tied `lm_head.weight` must equal
    it). Every tensor mapped, every parameter filled, floats of the expected shapes (checked
    from the shapes alone, before any tensor is converted): else a ConversionError listing all
    that is wrong. The params are float32 arrays, or with `lazy` `LazyParam`s in the
    checkpoint's dtype, read when loaded."""
    names = set(tensors)
    if cfg.tie_embeddings and "lm_head.weight" in names:
        # Some writers keep the tied copy; it carries nothing only if it is the embedding.
        head = tensors["lm_head.weight"]
        emb = tensors[embedding] if embedding in names else None
        if emb is None or head.shape != emb.shape or head.tobytes() != emb.tobytes():
            raise ConversionError(f"{fmt} checkpoint: tie_word_embeddings is true but "
                                  f"lm_head.weight differs from {embedding}")
        del head, emb
        names.discard("lm_head.weight")
    shapes = param_shapes(cfg)
    mapped = {n for n, _, _ in entries}
    missing = [n for n, _, _ in entries if n not in names]
    leftover = sorted(names - mapped)
    if missing or leftover:
        raise ConversionError(
            f"{fmt} checkpoint does not match its config:"
            + (f"\n  missing tensors: {missing}" if missing else "")
            + (f"\n  tensors left over (not mapped to any parameter): {leftover}"
               if leftover else ""))
    wrong, plain, stacked = [], {}, {}
    for name, parts, how in entries:
        shape, dtype = tensor_meta(tensors, name)
        if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
            wrong.append(f"{name}: dtype {dtype}")
            continue
        rows = [torch_shape(how, part_shape(shapes, p))[0] for p in parts]
        want = (sum(rows),) + torch_shape(how, part_shape(shapes, parts[0]))[1:]
        if shape != want:
            wrong.append(f"{name}: shape {shape}, expected {want} for "
                         + ", ".join(f"{'/'.join(part_path(p))} {part_shape(shapes, p)}"
                                     for p in parts))
            continue
        for p, start, n in zip(parts, np.cumsum([0] + rows), rows):
            piece = (name, how, int(start), n, part_shape(shapes, p), dtype)
            if isinstance(p, Stacked):
                stacked.setdefault(p.path, {})[p.index] = piece
            else:
                plain[p] = piece
    unmapped = sorted(set(shapes) - set(plain) - set(stacked))
    if wrong or unmapped:
        raise ConversionError(f"{fmt} checkpoint: " + "; ".join(wrong)
                              + (f"; parameters with no {fmt} tensor: {unmapped}"
                                 if unmapped else ""))

    def read(piece):
        name, how, start, n, shape, _ = piece
        w = np.asarray(tensors[name])
        if row_order(how) is not None:
            w = w[row_order(how)]
        return to_ours(how, w[start:start + n], shape)

    def read_stacked(path, pieces):
        out = np.empty(shapes[path], pieces[0][-1])
        for i, piece in pieces.items():
            out[i] = read(piece)
        return out

    sources = {p: LazyParam(shapes[p], piece[-1], lambda piece=piece: read(piece))
               for p, piece in plain.items()}
    sources.update({p: LazyParam(shapes[p], pieces[0][-1],
                                 lambda p=p, pieces=pieces: read_stacked(p, pieces))
                    for p, pieces in stacked.items()})
    params = {}
    for p, src in sources.items():
        set_path(params, p, src if lazy else src.load().astype(np.float32))
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
def _safetensors_dtypes() -> dict:
    import ml_dtypes
    return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
            "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


# safetensors' dtype names of the float tensors we convert (anything else reads as an integer
# dtype, which the converters refuse by name).
_SAFETENSORS_DTYPES = _safetensors_dtypes()


class SafetensorsDir(Mapping):
    """{tensor name: NumPy array} over a checkpoint's safetensors files that reads a tensor
    only when it is taken (`safe_open`, memory-mapped), so that a checkpoint larger than host
    memory is never read whole: a converter takes a tensor when it writes the parameters it
    holds, converts it and lets it go; `meta(name)` gives its shape and dtype from the header.
    `skip(name)` hides tensors (a release's extra heads)."""

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

    def meta(self, name: str) -> tuple[tuple, np.dtype]:
        """(shape, dtype) of a tensor from its file's header, without reading it."""
        sl = self._files[self._where[name]].get_slice(name)
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(),
                                                              np.dtype(np.int8))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where


class RenamedTensors(Mapping):
    """A checkpoint's tensors under other names ({new name: its name in `tensors`}), read when
    taken, as `tensors` reads them."""

    def __init__(self, tensors: Mapping, names: Mapping[str, str]):
        self._tensors, self._names = tensors, dict(names)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[self._names[name]]

    def meta(self, name: str) -> tuple[tuple, np.dtype]:
        return tensor_meta(self._tensors, self._names[name])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


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


def _one_at_a_time_checkpointer():
    """An orbax Checkpointer whose pytree leaves are `LazyParam`s, written one after another:
    each is loaded, written and let go before the next is loaded, so that writing a model
    holds one parameter in host memory, not the model. On disk they are ordinary NumPy arrays
    (orbax's 'np.ndarray' entries), which `load_pretrained` restores like any checkpoint."""
    import orbax.checkpoint as ocp

    class OneAtATime(ocp.type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)   # nothing is held to copy

        async def _background_serialize(self, values, infos, args=None):
            for value, info, arg in zip(values, infos, args):
                await super()._background_serialize([value.load()], [info], [arg])

    registry = ocp.type_handlers.create_type_handler_registry((LazyParam, OneAtATime()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def save_workdir(cfg: ModelConfig, params: Mapping, workdir: str, source: dict,
                 dtype=None) -> str:
    """A checkpoint step directory <workdir>/checkpoints/0 with the items `load_pretrained`
    reads (params, meta), and <workdir>/train_config.py, an experiment config that continues
    training from it; returns the step directory. `params` leaves are arrays or `LazyParam`s
    (an import's, read from its checkpoint as they are written: one parameter at a time in
    host memory); each is stored in its own dtype (a bf16 release stays bf16 on disk;
    load_pretrained casts to the model's float32), or in `dtype` if given."""
    import pprint

    import jax

    from mem_lm.pretrained import META_ITEM, PARAMS_ITEM
    workdir = os.path.abspath(workdir)
    step = os.path.join(workdir, "checkpoints", "0")
    if os.path.exists(step):
        raise FileExistsError(f"{step} exists; choose a new --out")

    def lazy(a):
        src = a if isinstance(a, LazyParam) else LazyParam(np.shape(a), np.asarray(a).dtype,
                                                           lambda: np.asarray(a))
        if dtype is None:
            return src
        return LazyParam(src.shape, dtype, lambda: src.load().astype(dtype))

    with _one_at_a_time_checkpointer() as ckptr:
        ckptr.save(os.path.join(step, PARAMS_ITEM),
                   jax.tree.map(lazy, params, is_leaf=lambda a: isinstance(a, LazyParam)))
    os.makedirs(os.path.join(step, META_ITEM))
    with open(os.path.join(step, META_ITEM, "meta.json"), "w") as f:
        json.dump({"model_config": cfg.to_dict(), "source": source}, f, indent=2)
    path = os.path.join(workdir, "train_config.py")
    with open(path, "w") as f:
        f.write(_TRAIN_CONFIG.format(source=source.get("path", "a checkpoint"), path=path,
                                     model=pprint.pformat(cfg.to_dict(), indent=4),
                                     workdir=workdir))
    return step
