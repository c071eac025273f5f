"""`impl="xla"`: one gather and a weighted sum forward; the backward scatter-adds the
output gradient into the table (never a one-hot or a [tokens, N] array) and reads the weight
gradients off the gathered rows.

The custom_vjp exists for the table gradient's precision: autodiff of a gather scatter-adds in
the table's dtype, so a bf16 table would sum its duplicate indices' contributions in bf16; here
they are summed in float32 and cast once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import common


def clean(indices, weights, table_rows: int):
    """(indices clipped into [0, N), weights zeroed where the index was outside [0, N)): a
    gather and a scatter of the cleaned pair touch only valid rows, and an invalid slot adds
    nothing."""
    valid = (indices >= 0) & (indices < table_rows)
    return jnp.where(valid, indices, 0).astype(jnp.int32), jnp.where(valid, weights, 0), valid


def acc_dtype(weights, table):
    return jnp.promote_types(common.acc_dtype(weights), table.dtype)


def table_grad(indices, weights, table, do):
    """d table [N, D] (table's dtype): Σ over bag slots of weight · do, scatter-added in the
    accumulation dtype at each slot's row. `indices`/`weights` are cleaned (`clean`)."""
    acc = acc_dtype(weights, table)
    D = table.shape[1]
    upd = weights.astype(acc)[..., None] * do.astype(acc)[..., None, :]
    dt = jnp.zeros(table.shape, acc).at[indices.reshape(-1)].add(upd.reshape(-1, D),
                                                                mode="drop")
    return dt.astype(table.dtype)


def embedding_bag_xla(indices, weights, table):
    """Validated inputs -> o [..., D] in result_type(weights, table)."""
    idx, w, valid = clean(indices, weights, table.shape[0])
    return _bag(table.shape[0], idx, w, valid, table)


def _forward(idx, w, table):
    acc = acc_dtype(w, table)
    o = jnp.einsum("...k,...kd->...d", w.astype(acc), table[idx].astype(acc))
    return o.astype(jnp.result_type(w, table))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bag(N, idx, w, valid, table):
    return _forward(idx, w, table)


def _bag_fwd(N, idx, w, valid, table):
    return _forward(idx, w, table), (idx, w, valid, table)


def _bag_bwd(N, res, do):
    idx, w, valid, table = res
    acc = acc_dtype(w, table)
    dw = jnp.einsum("...d,...kd->...k", do.astype(acc), table[idx].astype(acc))
    dw = jnp.where(valid, dw, 0).astype(w.dtype)
    return None, dw, None, table_grad(idx, w, table, do)


_bag.defvjp(_bag_fwd, _bag_bwd)
