"""`impl="pallas"`: the weighted gather and the weight gradient as Pallas kernels; the table
gradient is XLA's scatter-add (`xla.table_grad`: atomics on GPU, sorted segments on TPU),
which a Pallas kernel would have to re-implement with atomics or a sort.

Two layouts, both over tokens flattened to M = prod(batch dims):
  tpu  one grid step per (token, bag slot): the indices arrive by scalar prefetch and the
       table's BlockSpec index_map picks row indices[m, j], so Mosaic DMAs exactly the rows
       a bag needs; the slot axis is the reduction ("arbitrary") axis of the output block.
  gpu  (Triton) one program per (block of BT tokens, block of BD table columns): the table
       is one block (a pointer into global memory) and each of the k slots is a gather load
       of BT rows; k and M are padded to powers of two with weight-0 slots.
`backend` ("tpu" | "gpu") and `interpret` override the choice (the tests run both layouts in
interpret mode and lower both for their hardware).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..common import default_backend, default_interpret
from . import xla

BLOCK_TOKENS_GPU = 32
BLOCK_COLUMNS_GPU = 128


def embedding_bag_pallas(indices, weights, table, *, backend: Optional[str] = None,
                         interpret: Optional[bool] = None):
    """Validated inputs -> o [..., D] in result_type(weights, table)."""
    backend = backend or default_backend()
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"`backend` must be 'tpu' or 'gpu', got {backend!r}")
    interpret = default_interpret() if interpret is None else bool(interpret)
    idx, w, valid = xla.clean(indices, weights, table.shape[0])
    lead, k = idx.shape[:-1], idx.shape[-1]
    o = _bag((backend, interpret), idx.reshape(-1, k), w.reshape(-1, k),
             valid.reshape(-1, k), table)
    return o.reshape(lead + table.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bag(how, idx, w, valid, table):
    return _gather(how, idx, w, table)


def _bag_fwd(how, idx, w, valid, table):
    return _gather(how, idx, w, table), (idx, w, valid, table)


def _bag_bwd(how, res, do):
    idx, w, valid, table = res
    dw = jnp.where(valid, _weight_grad(how, idx, table, do), 0).astype(w.dtype)
    return None, dw, None, xla.table_grad(idx, w, table, do)


_bag.defvjp(_bag_fwd, _bag_bwd)


def _gather(how, idx, w, table):
    acc = xla.acc_dtype(w, table)
    kernels = _TPU if how[0] == "tpu" else _GPU
    o = kernels[0](idx, w.astype(acc), table, acc, how[1])
    return o.astype(jnp.result_type(w, table))


def _weight_grad(how, idx, table, do):
    acc = xla.acc_dtype(do, table)
    kernels = _TPU if how[0] == "tpu" else _GPU
    return kernels[1](idx, do.astype(acc), table, acc, how[1])


# ----------------------------------------------------------------------------- TPU (Mosaic)
def _tpu_call(kernel, idx, operand, operand_spec, table, out_shape, out_spec, dims, interpret):
    from jax.experimental.pallas import tpu as pltpu
    M, k = idx.shape
    N, D = table.shape
    # [N, 1, D]: a (1, D) block equals the trailing dims, so any D passes Mosaic's (8, 128) rule.
    row = pl.BlockSpec((None, 1, D), lambda m, j, ids: (ids[m * k + j], 0, 0))
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(M, k), in_specs=[operand_spec, row],
            out_specs=out_spec),
        compiler_params=pltpu.CompilerParams(dimension_semantics=dims),
        interpret=interpret,
    )(idx.reshape(-1), operand, table.reshape(N, 1, D))


def _tpu_gather(idx, w, table, acc, interpret):
    M, k = idx.shape
    D = table.shape[1]

    def kernel(ids_ref, w_ref, row_ref, o_ref):
        @pl.when(pl.program_id(1) == 0)
        def _():
            o_ref[...] = jnp.zeros_like(o_ref)
        o_ref[...] += w_ref[...] * row_ref[...].astype(acc)

    out = _tpu_call(kernel, idx, w.reshape(M * k, 1, 1),
                    pl.BlockSpec((None, 1, 1), lambda m, j, ids: (m * k + j, 0, 0)), table,
                    jax.ShapeDtypeStruct((M, 1, D), acc),
                    pl.BlockSpec((None, 1, D), lambda m, j, ids: (m, 0, 0)),
                    ("parallel", "arbitrary"), interpret)
    return out.reshape(M, D)


def _tpu_weight_grad(idx, do, table, acc, interpret):
    M, k = idx.shape
    D = table.shape[1]

    def kernel(ids_ref, do_ref, row_ref, dw_ref):
        dw_ref[...] = jnp.sum(do_ref[...] * row_ref[...].astype(acc), axis=-1, keepdims=True)

    out = _tpu_call(kernel, idx, do.reshape(M, 1, D),
                    pl.BlockSpec((None, 1, D), lambda m, j, ids: (m, 0, 0)), table,
                    jax.ShapeDtypeStruct((M * k, 1, 1), acc),
                    pl.BlockSpec((None, 1, 1), lambda m, j, ids: (m * k + j, 0, 0)),
                    ("parallel", "parallel"), interpret)
    return out.reshape(M, k)


# ----------------------------------------------------------------------------- GPU (Triton)
def _gpu_layout(idx, extra, D):
    """Slots-major [kp, Mp] copies of idx and `extra` ([M, k] weights, or None) padded with
    index 0 / weight 0, and the block sizes (BT, BD)."""
    M, k = idx.shape
    kp = 1 << max(k - 1, 0).bit_length()
    BT = min(BLOCK_TOKENS_GPU, 1 << max(M - 1, 0).bit_length())
    Mp = -(-M // BT) * BT
    pad = ((0, kp - k), (0, Mp - M))
    idx_t = jnp.pad(idx.T, pad)
    extra_t = None if extra is None else jnp.pad(extra.T, pad)
    return idx_t, extra_t, BT, math.gcd(D, BLOCK_COLUMNS_GPU), kp, Mp


def _gpu_params():
    from jax.experimental.pallas import triton as pltr
    return pltr.CompilerParams(num_warps=4, num_stages=2)


def _gpu_gather(idx, w, table, acc, interpret):
    M, k = idx.shape
    N, D = table.shape
    idx_t, w_t, BT, BD, kp, Mp = _gpu_layout(idx, w, D)

    def kernel(idx_ref, w_ref, table_ref, o_ref):
        def slot(j, o):
            rows = table_ref[idx_ref[j, :], :].astype(acc)
            return o + w_ref[j, :][:, None] * rows
        o_ref[...] = lax.fori_loop(0, kp, slot, jnp.zeros((BT, BD), acc))

    slots = pl.BlockSpec((kp, BT), lambda t, d: (0, t))
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((Mp, D), acc), grid=(Mp // BT, D // BD),
        in_specs=[slots, slots, pl.BlockSpec((N, BD), lambda t, d: (0, d))],
        out_specs=pl.BlockSpec((BT, BD), lambda t, d: (t, d)),
        compiler_params=_gpu_params(), interpret=interpret,
    )(idx_t, w_t, table)
    return out[:M]


def _gpu_weight_grad(idx, do, table, acc, interpret):
    M, k = idx.shape
    N, D = table.shape
    idx_t, _, BT, BD, kp, Mp = _gpu_layout(idx, None, D)
    do = jnp.pad(do, ((0, Mp - M), (0, 0)))

    def kernel(idx_ref, do_ref, table_ref, dw_ref):
        def slot(j, carry):
            rows = table_ref[idx_ref[j, :], :].astype(acc)
            dw_ref[j, :] = jnp.sum(rows * do_ref[...], axis=1)
            return carry
        lax.fori_loop(0, kp, slot, 0)

    # One partial sum per column block; their sum is the weight gradient.
    parts = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((D // BD, kp, Mp), acc),
        grid=(Mp // BT, D // BD),
        in_specs=[pl.BlockSpec((kp, BT), lambda t, d: (0, t)),
                  pl.BlockSpec((BT, BD), lambda t, d: (t, d)),
                  pl.BlockSpec((N, BD), lambda t, d: (0, d))],
        out_specs=pl.BlockSpec((None, kp, BT), lambda t, d: (d, 0, t)),
        compiler_params=_gpu_params(), interpret=interpret,
    )(idx_t, do, table)
    return jnp.sum(parts, axis=0)[:k, :M].T


_TPU = (_tpu_gather, _tpu_weight_grad)
_GPU = (_gpu_gather, _gpu_weight_grad)
