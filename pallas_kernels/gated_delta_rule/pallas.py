"""`impl="pallas"`: the gated delta rule (g = None: DeltaNet; per-key gk: KDA),
as Pallas kernels for the device at hand, forward and backward.

TPU: Mosaic kernels; GPU: Pallas' Triton backend; elsewhere (CPU) the TPU layout runs in
interpret mode. Chunk-parallel phases around one sequential state pass (`pallas_kernels.
phases`); the chunk math is shared (`chunk_math`); only the memory layout and block
shapes differ (`phases.TPU_BLOCKS` / `GPU_BLOCKS`). `backend`
("tpu" | "gpu") and `interpret` override the choice (the tests run both layouts in interpret
mode and lower both for their hardware).
"""
from __future__ import annotations

from typing import Optional

from ..scan import phases


def gated_delta_rule_pallas(q, k, v, beta, g, gk=None, *, scale, initial_state, cu_seqlens,
                            chunk_size, backend: Optional[str] = None,
                            interpret: Optional[bool] = None, tf32: Optional[bool] = None):
    """Validated inputs as for the other impls -> (o in q's dtype, final state [N, H, K, V]).
    `tf32`: float32 inputs as TF32 on a GPU (None: the backend's policy, `phases.Blocks.tf32`,
    which states the tolerance; False: full float32).
    With per-key gates gk the chunks are `chunk_math.SUB` tokens (the kernels form
    [C, C, K] decay blocks), as for linear attention's gk."""
    return phases.chunked_scan(
        "gdn", q, k, v, beta=beta, g=g, gk=gk, scale=scale, initial_state=initial_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, blocks=phases.blocks_for(backend, tf32),
        interpret=interpret)
