"""`impl="reference"`: the weighted gather written out slot by slot (plain, slow, obviously
right); JAX's own autodiff gives its gradients."""
from __future__ import annotations

import jax.numpy as jnp

from .. import common


def embedding_bag_reference(indices, weights, table):
    """Validated inputs -> o [..., D] = Σ_j weights[..., j] · table[indices[..., j]], in
    result_type(weights, table); indices outside [0, N) add nothing."""
    acc = jnp.promote_types(common.acc_dtype(weights), table.dtype)
    N = table.shape[0]
    o = jnp.zeros(indices.shape[:-1] + table.shape[1:], acc)
    for j in range(indices.shape[-1]):
        i = indices[..., j]
        valid = (i >= 0) & (i < N)
        row = table[jnp.where(valid, i, 0)].astype(acc)
        o = o + jnp.where(valid, weights[..., j].astype(acc), 0)[..., None] * row
    return o.astype(jnp.result_type(weights, table))
