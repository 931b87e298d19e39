"""Interleaved rotary position embedding (pairs (x0, x1), (x2, x3), ... each rotate by one frequency).

The rotated output is laid out [rotated evens | rotated odds], as transformers does: queries and keys get
the same permutation, so every dot product equals that of the re-interleaved form.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(dim: int, rope_parameters: dict) -> np.ndarray:
    """Per-pair inverse frequencies; the hook where RoPE scaling for context extension applies.

    `rope_type` "default": theta ** (-2i / dim). "linear": the same, divided by `factor` (positions are
    stretched by `factor`).
    """
    theta = float(rope_parameters["rope_theta"])
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    if rope_parameters.get("rope_type", "default") == "linear":
        inv = (inv / np.float32(rope_parameters["factor"])).astype(np.float32)
    return inv


def rope_angles(positions, inv_freq, dtype):
    """cos and sin of shape [batch, length, dim / 2] for integer `positions` [batch, length]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate the last axis of `x` [batch, length, ..., dim]; cos/sin are [batch, length, dim / 2]."""
    extra = x.ndim - 3
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[-1:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[-1:])
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
