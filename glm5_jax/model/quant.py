"""INT4 weight quantization of the routed experts: the one quantizer of QAT training, of the forward of a
QAT checkpoint, and of the INT4 export (glm5_jax/convert/int4.py), so the three agree bit for bit.

Symmetric, per group of `group_size` consecutive elements along the weight's input dimension:
s = max(max |w| over the group * float32(1 / 7), 1e-5), q = clamp(round(w / s), -7, 7) (round half to
even), and the forward multiplies with q * s. The arithmetic runs in float32 whatever the dtype of `w` (the
model's compute dtype: the forward quantizes the weights after casting them to it). The scale is rounded to a
number of w's dtype (`reduce_precision`, which XLA never elides), and q * s is cast to w's dtype, so a
dequantizer that computes q.to(s.dtype) * s from the scale stored in w's dtype gets the same numbers: in
float32 one rounded product either way, in bfloat16 the exact float32 product (a 3-bit integer times an 8-bit
significand) rounded once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

INT4_MAX = 7
# XLA rewrites a division by a constant into a multiplication by its reciprocal (measured: max / 7 differs
# from a true division in the last bit for most groups), and might not everywhere: the scale multiplies by the
# float32 reciprocal explicitly, which every compiler and numpy compute alike.
INV_INT4_MAX = np.float32(1 / INT4_MAX)
MIN_SCALE = 1e-5


def _grouped(w, group_size: int, axis: int):
    axis %= w.ndim
    return w.reshape(w.shape[:axis] + (w.shape[axis] // group_size, group_size) + w.shape[axis + 1:]), axis


def _quantize(w, group_size: int, axis: int):
    """(q and s in float32, q grouped [..., n_groups, group_size, ...], s with a kept group axis; axis)."""
    g, axis = _grouped(w.astype(jnp.float32), group_size, axis)
    s = jnp.maximum(jnp.max(jnp.abs(g), axis=axis + 1, keepdims=True) * INV_INT4_MAX, MIN_SCALE)
    info = jnp.finfo(w.dtype)
    s = jax.lax.reduce_precision(s, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    q = jnp.clip(jnp.round(g / s), -INT4_MAX, INT4_MAX)
    return q, s, axis


@functools.partial(jax.jit, static_argnames=("group_size", "axis"))
def int4_groups(w, group_size: int, axis: int):
    """(q int8 shaped like w, s [w.shape with `axis` divided by group_size] in w.dtype): w's INT4 groups
    along `axis`, whose length group_size must divide."""
    q, s, axis = _quantize(w, group_size, axis)
    return q.astype(jnp.int8).reshape(w.shape), jnp.squeeze(s, axis + 1).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_int4(w, group_size: int, axis: int):
    """q * s of `int4_groups` in w.dtype, exactly; the gradient passes straight through to w (STE)."""
    q, s, _ = _quantize(w, group_size, axis)
    return (q * s).astype(w.dtype).reshape(w.shape)


def _fake_int4_fwd(w, group_size, axis):
    return fake_int4(w, group_size, axis), None


def _fake_int4_bwd(group_size, axis, _, g):
    return (g,)


fake_int4.defvjp(_fake_int4_fwd, _fake_int4_bwd)
