"""RMSNorm and LayerNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax.model.params import make_param


def rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, weight, bias, eps: float):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, axis: str, stack: int | None, param_dtype):
        self.eps = eps
        self.weight = make_param(None, (dim,), (axis,), stack=stack, dtype=param_dtype, init="ones")

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, axis: str, stack: int | None, param_dtype):
        self.eps = eps
        self.weight = make_param(None, (dim,), (axis,), stack=stack, dtype=param_dtype, init="ones")
        self.bias = make_param(None, (dim,), (axis,), stack=stack, dtype=param_dtype, init="zeros")

    def __call__(self, x):
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)
