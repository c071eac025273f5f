"""The chunked-scan machinery the recurrent op families (linear_attention, gated_delta_rule)
share; the families' `xla.py` and `pallas.py` call into it, users call the families.

- `chunked`: the XLA form — each chunk an affine map of its incoming state, scanned over chunks.
- `chunk_math`: the math of one chunk, written once for every Pallas kernel and phase.
- `parallel`: the chunk-parallel Pallas kernels (one program per batch·head, chunk, value tile).
- `sequential_tpu` / `sequential_gpu`: each backend's sequential state pass (Mosaic / Triton),
  with their operands in one order (`operands`).
- `phases`: the Pallas scan as one differentiable function (phases, custom_vjp, block policy).
- `context_parallel`: T sharded over a mesh axis, state maps exchanged between devices.
"""
