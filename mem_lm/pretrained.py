"""Load a trained model from a training run, without any of the training code.

    from mem_lm.pretrained import load_pretrained
    model, variables = load_pretrained("runs/demo")          # a workdir: its newest checkpoint
    model, variables = load_pretrained("runs/demo/checkpoints/400")   # one checkpoint
    logits = model.apply(variables, tokens)

`variables` is `{"params": <plain nested dict of jax arrays>}`. Imports only mem_lm, jax, numpy
and orbax. A checkpoint step directory written by `python -m train` holds the items `params`
(what is read here), `train_state`, `data` and `meta` (JSON: the resolved run config, with the
`ModelConfig` under `model_config`).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import jax

META_ITEM, PARAMS_ITEM = "meta", "params"


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_ITEM)) and os.path.isdir(os.path.join(path, META_ITEM))


def _checkpoint_root(path: str) -> str:
    """The directory holding step subdirectories, for a workdir or a checkpoints directory."""
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            custom = json.load(f).get("checkpoint", {}).get("dir")
        if custom:
            return custom
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def checkpoint_steps(path: str) -> list[str]:
    """Complete checkpoint step directories under a workdir or checkpoints dir, newest first."""
    root = _checkpoint_root(path)
    if not os.path.isdir(root):
        return []
    steps = [n for n in os.listdir(root) if n.isdigit() and _is_step_dir(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(steps, key=int, reverse=True)]


def read_meta(step_dir: str) -> dict:
    meta_dir = os.path.join(step_dir, META_ITEM)
    for name in ("metadata", "meta.json"):
        f = os.path.join(meta_dir, name)
        if os.path.isfile(f):
            with open(f) as fh:
                return json.load(fh)
    raise FileNotFoundError(f"{meta_dir} has no JSON metadata")


def param_shardings(model, mesh, rules):
    """{param path: NamedSharding} of `model`'s parameters on `mesh` by their logical axis
    names (layers.common) under `rules`, flax logical axis rules ((logical name, mesh axes or
    None), ...), e.g. `train.config.logical_axis_rules(config)`; a logical name the rules do
    not list is replicated, and so is an array axis its mesh axes do not divide (a released
    model's 2 KV heads on a tensor axis of 4: whole copies rather than no load)."""
    import math

    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec
    tokens = jax.ShapeDtypeStruct((1, 8), jax.numpy.int32)
    boxed = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)

    def fit(spec, a):
        size = lambda axes: math.prod(mesh.shape[n] for n in
                                      ((axes,) if isinstance(axes, str) else axes))
        return NamedSharding(mesh, PartitionSpec(*(
            axes if axes is None or dim % size(axes) == 0 else None
            for axes, dim in zip(tuple(spec) + (None,) * (a.ndim - len(spec)), a.shape))))

    return jax.tree_util.tree_map(fit, specs, nn.meta.unbox(boxed),
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def _load_step(step_dir: str, sharding=None, mesh=None, rules=None):
    import orbax.checkpoint as ocp
    from flax.core import meta as flax_meta

    from mem_lm import LanguageModel, ModelConfig

    meta = read_meta(step_dir)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = LanguageModel(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), jax.numpy.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
    shapes = flax_meta.unbox(shapes)
    if mesh is not None:
        placed = param_shardings(model, mesh, rules)
    else:
        one = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        placed = jax.tree_util.tree_map(lambda _: one, shapes)
    # orbax reads each array's shards straight onto their devices: no host-side full copy.
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, placed)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(step_dir), PARAMS_ITEM), abstract)
    return model, {"params": params}


def load_pretrained(path: str, step: Optional[int] = None, sharding=None, mesh=None,
                    rules=None):
    """`(model, variables)` from a workdir (newest readable checkpoint, or `step`), a
    checkpoints directory, or one checkpoint step directory. Params land on `sharding`
    (default: the first local device), or with `mesh` (a jax.sharding.Mesh) sharded by the
    model's logical axes under `rules` (flax logical axis rules; the trainer's are
    `train.config.logical_axis_rules(config)`, e.g. experts over `tensor`): each device reads
    only its shards."""
    if mesh is not None and (rules is None or sharding is not None):
        raise ValueError("load_pretrained: mesh= needs rules= (logical axis rules) and no "
                         "sharding=")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_pretrained: {path} does not exist")
    if _is_step_dir(path):
        return _load_step(path, sharding, mesh, rules)
    candidates = checkpoint_steps(path)
    if step is not None:
        candidates = [c for c in candidates if int(os.path.basename(c)) == int(step)]
    if not candidates:
        raise FileNotFoundError(f"load_pretrained: no complete checkpoint"
                                f"{'' if step is None else f' for step {step}'} under {path}")
    errors = []
    for c in candidates:
        try:
            return _load_step(c, sharding, mesh, rules)
        except Exception as e:  # noqa: BLE001 - fall back to an older checkpoint
            warnings.warn(f"load_pretrained: checkpoint {c} cannot be read ({type(e).__name__}: "
                          f"{str(e)[:200]}); trying an older one")
            errors.append(f"{c}: {e}")
    raise RuntimeError("load_pretrained: no readable checkpoint:\n" + "\n".join(errors))
