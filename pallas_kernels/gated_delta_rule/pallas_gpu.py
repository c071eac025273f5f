"""The gated delta rule (g = None: DeltaNet):
the GPU (Pallas' Triton backend) kernels, forward and backward.

Grid (batch·heads, V tiles of 64) with the chunk loop inside the kernel (a fori_loop carrying
the float32 state); K and V are padded to powers of two >= 16 (Triton's tensor shapes);
num_warps=4, num_stages=2.

The chunk math is shared with the other backend (`pallas_kernels.pallas_common`); only the
memory layout and block shapes differ. Without a GPU the kernels run with `interpret=True`.
"""
from __future__ import annotations

from typing import Optional

from .. import pallas_common


def gated_delta_rule_pallas_gpu(q, k, v, beta, g, *, scale, initial_state, cu_seqlens, chunk_size,
                                interpret: Optional[bool] = None):
    """Validated inputs as for the other impls -> (o in q's dtype, final state [N, H, K, V])."""
    return pallas_common.chunked_scan(
        "gdn", q, k, v, beta=beta, g=g, scale=scale, initial_state=initial_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, blocks=pallas_common.GPU_BLOCKS,
        interpret=interpret)
