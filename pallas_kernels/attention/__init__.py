"""Softmax attention: causal, GQA, sliding window, attention sinks, segment ids, positions.

```python
o = attention(q, k, v, *, scale=None, causal=True, window=None, sinks=None,
              segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None,
              prefix_k=None, prefix_v=None, impl="auto", block_q=512)
```
q [B, Tq, H, D]; k [B, Tk, Hkv, D]; v [B, Tk, Hkv, Dv]; H % Hkv == 0 (GQA / MQA).

Which keys a query sees is decided by positions (int32 [B, T] or [T]):
  * `q_positions` default `Tk - Tq + arange(Tq)` (queries are the last Tq tokens),
    `kv_positions` default `arange(Tk)`; a key slot with a negative position is empty
    (how decode caches mark unfilled or ring-buffer slots).
  * causal: key position <= query position; `window` W: query pos − key pos < W
    (the query itself counts, so W = 1 sees only itself).
  * `segment_ids` [B, Tq] (and `kv_segment_ids` [B, Tk], default `segment_ids` when
    Tq == Tk): a query sees only keys with the same id (packed documents).
  * `sinks` [H]: a learned logit per head that joins the softmax denominator with a zero
    value (attention may put its mass "nowhere").
  * `prefix_k` [P, Hkv, D], `prefix_v` [P, Hkv, Dv]: P keys/values, the same for every batch
    row, that every query sees whatever the mask says (Titans' persistent memory tokens: the
    paper's "attention with prefix"); no position of their own (the caller rotates them or
    not). They join each query's softmax with its masked keys.
A query that sees no key returns zeros. Accumulation is float32 (float64 for float64 input);
`o` has q's dtype.

impl: "reference" (all scores, kv repeated), "xla" (query blocks under checkpoint, grouped
kv, window-sliced keys, any backend), "cudnn" (cuDNN flash attention, CUDA GPUs), "splash"
(JAX's splash attention, TPUs; interpret mode elsewhere), "auto": the platform's library
kernel when it can serve the call, else xla (`library.choose_impl`; the library kernels and
what they serve are described in `library.py`). Asking for "cudnn" or "splash" by name for a
call it cannot serve raises a ValueError saying why.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from pallas_kernels.common import check_rank
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.xla import attention_xla
from pallas_kernels.attention.mask import attention_mask
from pallas_kernels.attention import library

__all__ = ["attention", "attention_reference", "attention_xla", "attention_mask"]

IMPLS = ("auto", "reference", "xla", "cudnn", "splash")


def _positions(name, pos, B, T):
    if pos is None:
        return None
    pos = jnp.asarray(pos)
    if pos.ndim == 1:
        pos = pos[None]
    if pos.ndim != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
        raise ValueError(f"`{name}` must have shape [B, T] = ({B}, {T}) or [T], got {pos.shape}")
    if not jnp.issubdtype(pos.dtype, jnp.integer):
        raise ValueError(f"`{name}` must be an integer array, got dtype {pos.dtype}")
    return pos.astype(jnp.int32)


def attention(q, k, v, *, scale: Optional[float] = None, causal: bool = True,
              window: Optional[int] = None, sinks=None, segment_ids=None, kv_segment_ids=None,
              q_positions=None, kv_positions=None, prefix_k=None, prefix_v=None,
              impl: str = "auto", block_q: int = 512):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4)
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape != (B, Tk, Hkv, D):
        raise ValueError(f"`k` must have shape [B, Tk, Hkv, D] with B, D of q {q.shape}, "
                         f"got {k.shape}")
    if v.shape[:3] != (B, Tk, Hkv):
        raise ValueError(f"`v` must have shape [B, Tk, Hkv, Dv] to match k {k.shape}, "
                         f"got {v.shape}")
    if H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv}): "
                         f"q {q.shape}, k {k.shape}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"`window` must be a positive int or None, got {window!r}")
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"`sinks` must have shape [H] = ({H},), got {tuple(sinks.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("`prefix_k` and `prefix_v` go together: got only "
                         f"`{'prefix_k' if prefix_v is None else 'prefix_v'}`")
    if prefix_k is not None:
        P = prefix_k.shape[0] if prefix_k.ndim == 3 else None
        if prefix_k.ndim != 3 or tuple(prefix_k.shape[1:]) != (Hkv, D):
            raise ValueError(f"`prefix_k` must have shape [P, Hkv, D] = [P, {Hkv}, {D}], "
                             f"got {tuple(prefix_k.shape)}")
        if tuple(prefix_v.shape) != (P, Hkv, v.shape[-1]):
            raise ValueError(f"`prefix_v` must have shape [P, Hkv, Dv] = "
                             f"{(P, Hkv, v.shape[-1])}, got {tuple(prefix_v.shape)}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, Tq):
            raise ValueError(f"`segment_ids` must have shape [B, Tq] = ({B}, {Tq}), "
                             f"got {tuple(segment_ids.shape)}")
        if kv_segment_ids is None:
            if Tq != Tk:
                raise ValueError("`kv_segment_ids` is needed when Tq != Tk "
                                 f"(q {q.shape}, k {k.shape})")
            kv_segment_ids = segment_ids
        if tuple(kv_segment_ids.shape) != (B, Tk):
            raise ValueError(f"`kv_segment_ids` must have shape [B, Tk] = ({B}, {Tk}), "
                             f"got {tuple(kv_segment_ids.shape)}")
    elif kv_segment_ids is not None:
        raise ValueError("`kv_segment_ids` given without `segment_ids`")

    explicit_positions = q_positions is not None or kv_positions is not None
    spec = library.CallSpec.of(q, k, v, causal=causal, window=window, sinks=sinks,
                               segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                               positions=explicit_positions, prefix=prefix_k is not None)
    impl = library.resolve_impl(impl, spec)

    scale = D ** -0.5 if scale is None else float(scale)
    if impl == "cudnn":
        return library.attention_cudnn(q, k, v, scale=scale, causal=causal, window=window)
    if impl == "splash":
        return library.attention_splash(q, k, v, scale=scale, causal=causal, window=window,
                                        sinks=sinks, q_seg=segment_ids, kv_seg=kv_segment_ids)

    default_positions = not explicit_positions and Tq <= Tk
    q_pos = _positions("q_positions", q_positions, B, Tq)
    kv_pos = _positions("kv_positions", kv_positions, B, Tk)
    if q_pos is None:
        q_pos = (Tk - Tq + jnp.arange(Tq, dtype=jnp.int32))[None]
    if kv_pos is None:
        kv_pos = jnp.arange(Tk, dtype=jnp.int32)[None]
    kw = dict(scale=scale, causal=causal, window=window, sinks=sinks, q_seg=segment_ids,
              kv_seg=kv_segment_ids, q_pos=q_pos, kv_pos=kv_pos, prefix_k=prefix_k,
              prefix_v=prefix_v)
    if impl == "reference":
        return attention_reference(q, k, v, **kw)
    return attention_xla(q, k, v, default_positions=default_positions, block_q=block_q, **kw)
