"""Rotary position embedding (rotate-half / GPT-NeoX convention), over the whole head or, partial
RoPE (Qwen3-Next, GPT-NeoX's rotary_pct), over its first `rotary_dim` dims only: rotate-half
within them, the rest passed through (transformers' `apply_rotary_pos_emb` with a shorter cos)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from layers.registry import SettingError, Shared


def check_rope_head_dim(shared: Shared) -> None:
    """The registry check of every mechanism that rotates q and k."""
    if shared.head_dim % 2:
        raise SettingError("head_dim", f"must be even for RoPE, got {shared.head_dim}")


def rotary_dims(head_dim: int, fraction: float) -> int:
    """The dims partial RoPE rotates: int(head_dim · fraction), as transformers computes it."""
    return int(head_dim * fraction)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
               rotary_dim: Optional[int] = None) -> jax.Array:
    """Rotate the first `rotary_dim` (default all; even) dims of x [B, T, H, D] by positions
    [B|1, T]; computed in float32."""
    D = x.shape[-1] if rotary_dim is None else rotary_dim
    if D % 2 or D > x.shape[-1]:
        raise ValueError(f"RoPE needs an even rotary dim <= the head dim, got {D} for x {x.shape}")
    if D < x.shape[-1]:
        rot = apply_rope(x[..., :D], positions, theta)
        return jnp.concatenate([rot, x[..., D:]], axis=-1)
    half = D // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions.astype(jnp.float32)[:, :, None, None] * freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
