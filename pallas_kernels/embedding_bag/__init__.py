"""The embedding bag: a weighted sum of table rows per token (a product-key memory's read).

    o[..., :] = Σ_j weights[..., j] · table[indices[..., j], :]

indices [..., k] integer, weights [..., k] floating, table [N, D] floating -> o [..., D] in
result_type(weights, table); the sum is accumulated in float32 (float64 for float64 inputs).
Indices outside [0, N) add nothing (their weight gradient is 0 and they write no table
gradient); a repeated index adds its rows as often as it appears. Gradients flow to weights and
table (indices are integers); the table gradient is a scatter-add, never a one-hot.

impl: "reference" (slot by slot), "xla" (gather + scatter-add backward), "pallas" (kernels;
interpret mode on CPU), "auto" (xla on every backend: XLA's gather is what the SPMD
partitioner splits when the table is sharded, and no benchmark has yet shown the kernels
faster on a GPU or TPU).

Bad input (rank, shape, dtype, impl) is a ValueError naming the argument and shapes, before
anything compiles. Arrays may be JAX (traced or not) or NumPy.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from .. import common
from .pallas import embedding_bag_pallas
from .reference import embedding_bag_reference
from .xla import embedding_bag_xla

_IMPLS = {"reference": embedding_bag_reference, "xla": embedding_bag_xla,
          "pallas": embedding_bag_pallas}


def embedding_bag(indices, weights, table, *, impl="auto"):
    """o [..., D] = Σ_j weights[..., j] · table[indices[..., j]]; see the module docstring."""
    indices, weights, table = common.as_inputs((), indices=indices, weights=weights,
                                               table=table)
    check_inputs(indices, weights, table)
    impl = common.resolve_impl(impl) if impl != "auto" else "xla"
    if math.prod(indices.shape) == 0:   # no slots: zeros; a kernel grid cannot be empty
        impl = "xla"
    return _IMPLS[impl](*common.to_jax(indices, weights, table))


def check_inputs(indices, weights, table) -> None:
    common.check_rank("table", table, 2)
    common.check_float("table", table)
    if len(indices.shape) < 1:
        raise ValueError(f"`indices` must have shape [..., k], got {tuple(indices.shape)}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"`indices` must be an integer array, got dtype {indices.dtype}")
    common.check_shape("weights", weights, indices.shape, "[..., k], as indices")
    common.check_float("weights", weights)


__all__ = ["embedding_bag"]
