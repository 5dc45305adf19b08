"""Rotary position embedding (rotate-half form) with optional Llama-3.1 frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(
    head_dim: int,
    base: float,
    scaling: bool = False,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_context: int = 8192,
) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] float64 (NumPy, computed once at trace time).

    With ``scaling`` the Llama-3.1 rule applies: wavelengths longer than
    original_context / low_freq_factor are divided by ``factor``, shorter than
    original_context / high_freq_factor are kept, and those in between are interpolated smoothly.
    """
    if head_dim % 2:
        raise ValueError(
            f"RoPE needs an even head dim, got {head_dim}; choose d_model and num_heads so that "
            "d_model / num_heads is even."
        )
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not scaling:
        return inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return np.where(is_medium, interpolated, out)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x`` [B, T, ..., d_h] by angle positions[b, t] * inv_freq (rotate-half pairing).

    Pairs channel i with channel i + d_h/2. The rotation runs in float32 and returns x.dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    # Broadcast [B, T, d_h/2] over the head axes between T and d_h.
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
