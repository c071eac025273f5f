"""The device mesh ("data", "fsdp", "tensor", "context") and the shardings derived from logical
axis names. "context" splits the sequence (T): batches [B, T] are sharded over the batch rule's
axes and the length rule's (configs/base.py: "data,fsdp" and "context")."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.base import MESH_AXES
from train.config import logical_axis_rules, parse_rule


def make_mesh(shape: tuple[int, ...], devices=None) -> Mesh:
    """A mesh of `prod(shape)` devices (the first ones when fewer than all are asked for), axes
    MESH_AXES; a (data, fsdp, tensor) shape gets context 1."""
    shape = tuple(shape) + (1,) * (len(MESH_AXES) - len(shape))
    devices = list(devices if devices is not None else jax.devices())
    n = math.prod(shape)
    if n == len(devices) and jax.process_count() == 1 and devices[0].platform == "tpu":
        from jax.experimental import mesh_utils  # topology-aware on TPU
        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        grid = np.asarray(devices[:n], dtype=object).reshape(shape)
    try:
        from jax.sharding import AxisType
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    except ImportError:  # older jax
        return Mesh(grid, MESH_AXES)


def rule_axes(config, name: str) -> tuple[str, ...]:
    """The mesh axes of the logical axis `name` under the config's rules."""
    r = parse_rule(config.rules[name])
    return (r,) if isinstance(r, str) else tuple(r or ())


def batch_axes(config) -> tuple[str, ...]:
    return rule_axes(config, "batch")


def batch_sharding(config, mesh: Mesh) -> NamedSharding:
    """[batch, length] arrays: the batch dimension over the batch rule's mesh axes, T over the
    length rule's ("context": split when mesh.context > 1)."""
    axes, length = batch_axes(config), rule_axes(config, "length")
    return NamedSharding(mesh, P(axes or None, length or None))


def logical_to_shardings(boxed_tree, mesh: Mesh, config):
    """NamedShardings for a tree whose leaves may be flax LogicallyPartitioned boxes (unboxed
    leaves, e.g. scalars, are replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, logical_axis_rules(config))


def describe(tree, shardings) -> list[str]:
    """One line per leaf: path, shape, partition spec (used in logs and tests)."""
    lines = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_sh = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat, flat_sh):
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {sh.spec}")
    return lines
