"""`impl="pallas"`: linear attention (scalar gate g, per-key gate gk, or none),
as Pallas kernels for the device at hand.

TPU -> `pallas_tpu` (Mosaic), GPU -> `pallas_gpu` (Triton backend); elsewhere (CPU) the TPU
layout runs in interpret mode. `backend` ("tpu" | "gpu") and `interpret` override the choice
(the tests run both layouts in interpret mode and lower both for their hardware).
"""
from __future__ import annotations

from typing import Optional

from .. import pallas_common


def linear_attention_pallas(q, k, v, g, gk, *, scale, initial_state, cu_seqlens, chunk_size,
                            backend: Optional[str] = None, interpret: Optional[bool] = None):
    backend = backend or pallas_common.default_backend()
    if backend == "tpu":
        from .pallas_tpu import linear_attention_pallas_tpu as fn
    elif backend == "gpu":
        from .pallas_gpu import linear_attention_pallas_gpu as fn
    else:
        raise ValueError(f"`backend` must be 'tpu' or 'gpu', got {backend!r}")
    return fn(q, k, v, g, gk, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
              chunk_size=chunk_size, interpret=interpret)
