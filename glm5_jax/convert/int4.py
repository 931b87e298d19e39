"""The INT4 export of the routed experts: compressed-tensors' `pack-quantized` format, the one vLLM and SGLang
load for INT4 MoE checkpoints.

Each routed expert projection `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` [out, in] becomes
`weight_packed` (int32 [out, ceil(in / 8)]: element j at bits 4 * (j % 8) of word j // 8, stored as q + 8),
`weight_scale` ([out, in / group_size], in the model's compute dtype) and `weight_shape` (int64 [out, in]).
q and s come from `int4_groups`, the quantizer the QAT forward uses, applied to the weight cast to the compute
dtype as the forward casts it; so the dequantized weight q.to(s.dtype) * s is the QAT forward's weight.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from glm5_jax.model.quant import int4_groups

ROUTED_EXPERT = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
# Every other linear layer of a GLM-5 model, as vLLM and transformers name them, stays unquantized.
IGNORE = ["lm_head", r"re:.*self_attn\..*", r"re:.*shared_experts\..*", r"re:.*mlp\.(gate|up|gate_up|down)_proj$",
          r"re:.*mlp\.gate$", r"re:.*eh_proj$", r"re:.*shared_head\..*"]


def quantization_config(group_size: int) -> dict:
    """config.json's `quantization_config`: INT4 symmetric groups of `group_size` along the input dimension."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": IGNORE, "kv_cache_scheme": None}


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., n] -> int32 [..., ceil(n / 8)], eight to a word along the last axis."""
    u = (q.astype(np.int32) + 8).astype(np.uint32)
    u = np.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, -u.shape[-1] % 8)]).reshape(*u.shape[:-1], -1, 8)
    return np.bitwise_or.reduce(u << (4 * np.arange(8, dtype=np.uint32)), axis=-1).view(np.int32)


class Int4Experts:
    """The routed experts' tensors of an INT4 export for model config `cfg` (its compute dtype and group)."""

    def __init__(self, cfg):
        self.group_size, self.dtype = cfg.qat_group_size, jnp.dtype(cfg.dtype)

    @staticmethod
    def covers(name: str) -> bool:
        return ROUTED_EXPERT.match(name) is not None

    def layout(self, name: str, shape: tuple[int, int]) -> list[tuple[str, tuple, np.dtype]]:
        """(name, shape, dtype) of the tensors replacing weight `name` of HF shape [out, in]."""
        out, n_in = shape
        base = name.removesuffix("weight")
        return [(base + "weight_packed", (out, -(-n_in // 8)), np.dtype(np.int32)),
                (base + "weight_scale", (out, n_in // self.group_size), np.dtype(self.dtype)),
                (base + "weight_shape", (2,), np.dtype(np.int64))]

    def tensors(self, name: str, weight: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The tensors of `layout`, from the HF weight [out, in] (the checkpoint's parameter dtype)."""
        q, s = int4_groups(jnp.asarray(weight).astype(self.dtype), self.group_size, -1)
        (packed, _, _), (scale, _, _), (shape, _, _) = self.layout(name, weight.shape)
        return [(packed, pack_int4(np.asarray(q))), (scale, np.asarray(s)),
                (shape, np.array(weight.shape, np.int64))]
