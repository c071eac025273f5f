"""Block-sparse attention: each query block attends to the key blocks listed for it, plus an
optional sliding window, with online softmax (flash-attention style).

```python
o = block_sparse_attention(q, k, v, block_indices, *, block_size, query_block_size=None,
                           window=None, causal=True, scale=None, segment_ids=None,
                           cu_seqlens=None, impl="auto")
```
q [B, T, H, D]; k [B, T, Hkv, D]; v [B, T, Hkv, Dv]; H % Hkv == 0 (GQA). Keys form blocks of
`block_size` (a power of two; T need not be a multiple: the op pads inside), NK =
ceil(T / block_size) of them; queries form blocks of `query_block_size` (a power of two no
larger than block_size; default block_size), NQ = ceil(T / query_block_size) of them.
`query_block_size=1` is NSA's per-token selection: every query token lists its own key
blocks, and a kernel program holds one token's GQA group of heads as its rows.
`block_indices` int [B, Hkv, NQ, S]: the key blocks query block i attends to, shared by the
G = H / Hkv query heads of a kv head (as NSA shares them, so a key block is loaded once per
group); −1 pads, entries outside [0, NK) are ignored, and listing a block twice is the same as
once.

Query token t sees key token s when s's block is listed for t's query block or t − s < `window`
(the window needs causal), and in any case s ≤ t (causal), s is in t's document
(`segment_ids` [B, T], or `cu_seqlens` [N+1] for B == 1: tokens past cu[N] get o = 0), s is a
real token. Dense sliding-window attention is the case with no listed blocks (S = 0 or all
−1). A query that sees no key gets o = 0. `scale` default D**-0.5. Accumulation is float32
(float64 for float64 input); o has q's dtype. Bad input is a ValueError naming the argument
and the shapes; values (the listed indices, traced offsets) are not checked.

impl: "reference" (dense [T, T] mask), "xla" (blocked jnp, flash-style custom_vjp, any
backend), "pallas" (the kernels of `pallas.py`: TPU layout with the block table as scalar
prefetch, GPU layout with loaded index vectors; interpret mode off-device), "auto" (pallas on
GPU and TPU, xla elsewhere). Each is differentiable in q, k, v.
"""
from __future__ import annotations

import jax.numpy as jnp

from .. import common
from .blocks import blocked
from .reference import block_sparse_attention_reference

__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]


def segments_from_cu_seqlens(cu_seqlens, T: int):
    """int32 [1, T]: the packed sequence of each token (N for tokens past cu[N])."""
    cu = cu_seqlens.astype(jnp.int32)
    return jnp.searchsorted(cu[1:], jnp.arange(T, dtype=jnp.int32), side="right")[None]


def block_sparse_attention(q, k, v, block_indices, *, block_size, query_block_size=None,
                           window=None, causal=True, scale=None, segment_ids=None,
                           cu_seqlens=None, impl="auto"):
    """o [B, T, H, Dv] in q's dtype. See the module docstring."""
    q, k, v, block_indices, segment_ids, cu_seqlens = common.as_inputs(
        ("segment_ids", "cu_seqlens"), q=q, k=k, v=v, block_indices=block_indices,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens)
    for name, x in (("q", q), ("k", k), ("v", v)):
        common.check_rank(name, x, 4)
        common.check_float(name, x)
    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    if tuple(k.shape) != (B, T, Hkv, D):
        raise ValueError(f"`k` must have shape [B, T, Hkv, D] with B, T, D of q {q.shape}, "
                         f"got {k.shape}")
    if tuple(v.shape[:3]) != (B, T, Hkv):
        raise ValueError(f"`v` must have shape [B, T, Hkv, Dv] to match k {k.shape}, "
                         f"got {v.shape}")
    if min(H, D, Hkv, Dv) < 1 or H % Hkv:
        raise ValueError(f"q heads must be a positive multiple of k/v heads and D, Dv >= 1: "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    block_size = common.check_positive_int("block_size", block_size, power_of_two=True)
    qbs = block_size if query_block_size is None else common.check_positive_int(
        "query_block_size", query_block_size, power_of_two=True)
    if qbs > block_size:
        raise ValueError(f"`query_block_size` must be at most block_size = {block_size}, "
                         f"got {qbs}")
    NQ = -(-T // qbs)
    common.check_rank("block_indices", block_indices, 4)
    if tuple(block_indices.shape[:3]) != (B, Hkv, NQ):
        raise ValueError(f"`block_indices` must have shape [B, Hkv, NQ, S] = ({B}, {Hkv}, "
                         f"{NQ}, S) (NQ = ceil(T / query_block_size) = ceil({T} / {qbs})), "
                         f"got {tuple(block_indices.shape)}")
    if not jnp.issubdtype(block_indices.dtype, jnp.integer):
        raise ValueError(f"`block_indices` must be an integer array, got dtype "
                         f"{block_indices.dtype}")
    causal = common.check_flag("causal", causal)
    if window is not None:
        window = common.check_positive_int("window", window)
        if not causal:
            raise ValueError("`window` needs causal=True (a window reaches back from the query)")
    scale = common.check_scale(scale, D)
    if segment_ids is not None:
        if cu_seqlens is not None:
            raise ValueError("give `segment_ids` or `cu_seqlens`, not both")
        common.check_shape("segment_ids", segment_ids, (B, T), "[B, T]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"`segment_ids` must be an integer array, got dtype "
                             f"{segment_ids.dtype}")
    common.check_cu_seqlens(cu_seqlens, B, T)
    impl = common.resolve_impl(impl)
    q, k, v, block_indices, segment_ids, cu_seqlens = common.to_jax(
        q, k, v, block_indices, segment_ids, cu_seqlens)
    if B * T == 0:
        return jnp.zeros((B, T, H, Dv), q.dtype)
    if cu_seqlens is not None:
        segment_ids = segments_from_cu_seqlens(cu_seqlens, T)
    kw = dict(block_size=block_size, window=window, causal=causal, scale=scale,
              segment_ids=segment_ids, query_block_size=qbs)
    if impl == "reference":
        o = block_sparse_attention_reference(q, k, v, block_indices, **kw)
    elif impl == "pallas":
        from .pallas import block_sparse_attention_pallas
        o = block_sparse_attention_pallas(q, k, v, block_indices, **kw)
    else:
        o = blocked(q, k, v, block_indices, impl="xla", **kw)
    if cu_seqlens is not None:
        o = jnp.where((segment_ids < cu_seqlens.shape[0] - 1)[..., None, None], o, 0)
    return o
