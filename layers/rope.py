"""Rotary position embedding (rotate-half / GPT-NeoX convention)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.registry import SettingError, Shared


def check_rope_head_dim(shared: Shared) -> None:
    """The registry check of every mechanism that rotates q and k."""
    if shared.head_dim % 2:
        raise SettingError("head_dim", f"must be even for RoPE, got {shared.head_dim}")


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotate x [B, T, H, D] (D even) by positions [B|1, T]; computed in float32."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got x {x.shape}")
    half = D // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions.astype(jnp.float32)[:, :, None, None] * freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
