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


def _load_step(step_dir: str, sharding=None):
    import orbax.checkpoint as ocp
    from flax.core import meta as flax_meta

    from mem_lm import LanguageModel, ModelConfig

    meta = read_meta(step_dir)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = LanguageModel(cfg)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tokens = jax.ShapeDtypeStruct((1, 8), jax.numpy.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
    shapes = flax_meta.unbox(shapes)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(step_dir), PARAMS_ITEM), abstract)
    return model, {"params": params}


def load_pretrained(path: str, step: Optional[int] = None, sharding=None):
    """`(model, variables)` from a workdir (newest readable checkpoint, or `step`), a
    checkpoints directory, or one checkpoint step directory. Params land on `sharding`
    (default: the first local device)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_pretrained: {path} does not exist")
    if _is_step_dir(path):
        return _load_step(path, sharding)
    candidates = checkpoint_steps(path)
    if step is not None:
        candidates = [c for c in candidates if int(os.path.basename(c)) == int(step)]
    if not candidates:
        raise FileNotFoundError(f"load_pretrained: no complete checkpoint"
                                f"{'' if step is None else f' for step {step}'} under {path}")
    errors = []
    for c in candidates:
        try:
            return _load_step(c, sharding)
        except Exception as e:  # noqa: BLE001 - fall back to an older checkpoint
            warnings.warn(f"load_pretrained: checkpoint {c} cannot be read ({type(e).__name__}: "
                          f"{str(e)[:200]}); trying an older one")
            errors.append(f"{c}: {e}")
    raise RuntimeError("load_pretrained: no readable checkpoint:\n" + "\n".join(errors))
