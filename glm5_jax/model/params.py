"""Parameter creation with logical axis names, and the variable type for router bias buffers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RouterBias(nnx.Variable):
    """The MoE selection bias (`e_score_correction_bias`): moved by the load-balancing rule, not by gradients."""


def make_param(rngs: nnx.Rngs | None, shape, axes, *, stack: int | None, dtype, init: str = "normal",
               std: float = 0.02) -> nnx.Param:
    """A parameter of `shape` (with a leading `layers` axis when `stack`) tagged with logical axis names.

    `init` is "normal" (std), "ones" or "zeros". Logical names (`embed`, `heads`, ...) leave the choice of
    mesh axes to a rules table outside the model; model code never names a mesh axis.
    """
    shape, axes = tuple(shape), tuple(axes)
    assert len(shape) == len(axes), (shape, axes)
    if stack is not None:
        shape, axes = (stack,) + shape, ("layers",) + axes
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def stacked(shape, axes, stack):
    """Shape and axes with the optional leading `layers` axis (for buffers made outside make_param)."""
    if stack is None:
        return tuple(shape), tuple(axes)
    return (stack,) + tuple(shape), ("layers",) + tuple(axes)
