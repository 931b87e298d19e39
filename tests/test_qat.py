"""INT4 QAT of the routed experts: the quantizer, its straight-through gradient, and the compressed-tensors
export, whose decompressed weights are the QAT forward's weights bit for bit."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from glm5_jax import config as config_lib
from glm5_jax.convert.int4 import pack_int4
from glm5_jax.errors import ConfigError
from glm5_jax.model.quant import fake_int4, int4_groups
from tests.conftest import run_cli

ct = pytest.importorskip("compressed_tensors")


def reference_int4(w: np.ndarray, group_size: int):
    """The recipe in numpy float32, groups along the last axis."""
    g = w.astype(np.float32).reshape(*w.shape[:-1], -1, group_size)
    s = np.maximum(np.abs(g).max(-1, keepdims=True) * np.float32(1 / 7), np.float32(1e-5))
    q = np.clip(np.round(g / s), -7, 7)
    return q.reshape(w.shape).astype(np.int8), s[..., 0]


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def ct_decompress(packed, scale, shape, group_size) -> torch.Tensor:
    """compressed-tensors' own decompression of one pack-quantized weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size))
    state = {"weight_packed": torch.from_numpy(packed), "weight_scale": to_torch(scale),
             "weight_shape": torch.tensor(shape)}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


@pytest.mark.parametrize("dtype,group_size,n_in", [("float32", 16, 64), ("bfloat16", 32, 64), ("float32", 4, 12)])
def test_quantizer_and_packing_match_the_recipe_and_compressed_tensors(dtype, group_size, n_in):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, n_in)).astype(np.float32)
    w[0, :group_size] = 0.0  # an all-zero group: the scale's floor 1e-5, q 0
    w = jnp.asarray(w).astype(dtype)
    q, s = int4_groups(w, group_size, -1)
    assert q.dtype == jnp.int8 and s.dtype == w.dtype and s.shape == (6, n_in // group_size)
    fake = fake_int4(w, group_size, -1)
    assert fake.dtype == w.dtype
    if dtype == "float32":
        want_q, want_s = reference_int4(np.asarray(w), group_size)
        np.testing.assert_array_equal(np.asarray(q), want_q)
        np.testing.assert_array_equal(np.asarray(s), want_s)
    assert np.abs(np.asarray(q)).max() == 7 and float(s[0, 0]) == float(jnp.asarray(1e-5, w.dtype))
    # the library's unpacking and dequantization of our packing, in the scale's dtype, is fake_int4 exactly
    got = ct_decompress(pack_int4(np.asarray(q)), np.asarray(s), w.shape, group_size)
    assert got.dtype == to_torch(np.asarray(s)).dtype
    np.testing.assert_array_equal(got.to(torch.float32).numpy(), np.asarray(fake.astype(jnp.float32)))
