"""The attention mask, shared by every attention impl: which keys each query may see."""
from __future__ import annotations

from typing import Optional

import jax


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, *, causal: bool, window: Optional[int],
                   q_seg: Optional[jax.Array], kv_seg: Optional[jax.Array]) -> jax.Array:
    """Boolean mask [B, Tq, Tk] (batch dim may be 1) from positions and segment ids.

    q_pos [B|1, Tq], kv_pos [B|1, Tk] int32. A key slot with a negative position is empty.
    A key is visible when it is filled, in the query's segment, not in the future (causal)
    and fewer than `window` positions back (sliding window, the query itself included).
    """
    qp = q_pos[:, :, None]
    kp = kv_pos[:, None, :]
    mask = kp >= 0
    if causal:
        mask = mask & (kp <= qp)
    if window is not None:
        mask = mask & (qp - kp < window)
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask
