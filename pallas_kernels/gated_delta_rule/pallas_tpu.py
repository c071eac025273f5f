"""The gated delta rule (g = None: DeltaNet):
the TPU (Mosaic) kernels, forward and backward.

Grid (batch·heads, V tiles of 128, chunks): the chunk axis is sequential ("arbitrary") and the
float32 state lives in a VMEM scratch across it; per-chunk reset flags and initial-state rows
are scalar-prefetched into SMEM and steer the index maps. K and V are padded to multiples of
128 lanes.

The chunk math is shared with the other backend (`pallas_kernels.pallas_common`); only the
memory layout and block shapes differ. Without a TPU the kernels run with `interpret=True`.
"""
from __future__ import annotations

from typing import Optional

from .. import pallas_common


def gated_delta_rule_pallas_tpu(q, k, v, beta, g, *, scale, initial_state, cu_seqlens, chunk_size,
                                interpret: Optional[bool] = None):
    """Validated inputs as for the other impls -> (o in q's dtype, final state [N, H, K, V])."""
    return pallas_common.chunked_scan(
        "gdn", q, k, v, beta=beta, g=g, scale=scale, initial_state=initial_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, blocks=pallas_common.TPU_BLOCKS,
        interpret=interpret)
