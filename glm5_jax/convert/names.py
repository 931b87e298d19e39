"""The map between Hugging Face tensor names and slots of this stack's (stacked) parameter arrays.

Every HF tensor is one `Entry`: a slot `path[index]` of one of our arrays. Linear weights are stored by
transformers as [out, in]; ours are [in..., out...] (the first `n_in` dims are inputs), so a slot is the
HF tensor transposed and reshaped, e.g. q_b_proj [H*256, 2048] <-> [2048, H, 256].
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from glm5_jax.model.transformer import layer_groups


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # HF tensor name
    path: str  # our leaf, dotted (as in the Orbax checkpoint)
    index: tuple[int, ...]  # leading indices of the slot in our leaf (layer in stack, expert)
    n_in: int | None  # linear weight: number of input dims in our slot; None: copied as is

    def hf_shape(self, slot_shape) -> tuple[int, ...]:
        if self.n_in is None:
            return tuple(slot_shape)
        return (math.prod(slot_shape[self.n_in:]), math.prod(slot_shape[: self.n_in]))

    def to_slot(self, tensor: np.ndarray, slot_shape) -> np.ndarray:
        return (tensor.T if self.n_in is not None else tensor).reshape(slot_shape)

    def to_hf(self, slot: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return slot
        shape = self.hf_shape(slot.shape)
        return np.ascontiguousarray(slot.reshape(shape[::-1]).T)


_ATTENTION = (
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight", None),
    ("self_attn.q_a_proj.weight", "self_attn.q_a_proj", 1),
    ("self_attn.q_a_layernorm.weight", "self_attn.q_a_layernorm.weight", None),
    ("self_attn.q_b_proj.weight", "self_attn.q_b_proj", 1),
    ("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa", 1),
    ("self_attn.kv_a_layernorm.weight", "self_attn.kv_a_layernorm.weight", None),
    ("self_attn.kv_b_proj.weight", "self_attn.kv_b_proj", 1),
    ("self_attn.o_proj.weight", "self_attn.o_proj", 2),
)
_INDEXER = (
    ("self_attn.indexer.wq_b.weight", "self_attn.indexer.wq_b", 1),
    ("self_attn.indexer.wk.weight", "self_attn.indexer.wk", 1),
    ("self_attn.indexer.k_norm.weight", "self_attn.indexer.k_norm.weight", None),
    ("self_attn.indexer.k_norm.bias", "self_attn.indexer.k_norm.bias", None),
    ("self_attn.indexer.weights_proj.weight", "self_attn.indexer.weights_proj", 1),
)
_SWIGLU = (("gate_proj.weight", "gate_proj", 1), ("up_proj.weight", "up_proj", 1), ("down_proj.weight", "down_proj", 1))
_MOE = (
    ("mlp.gate.weight", "mlp.gate", 1),
    ("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias", None),
) + tuple((f"mlp.shared_experts.{h}", f"mlp.shared_experts.{o}", n) for h, o, n in _SWIGLU)
_EXPERT = (("gate_proj.weight", "mlp.experts_gate"), ("up_proj.weight", "mlp.experts_up"),
           ("down_proj.weight", "mlp.experts_down"))
_MTP = (("enorm.weight", "mtp.enorm.weight", None), ("hnorm.weight", "mtp.hnorm.weight", None),
        ("eh_proj.weight", "mtp.eh_proj", 1), ("shared_head.norm.weight", "mtp.shared_head_norm.weight", None))


def _layer(hf: str, ours: str, index: tuple, *, moe: bool, indexer: bool, n_experts: int):
    table = _ATTENTION + (_INDEXER if indexer else ())
    table += _MOE if moe else tuple((f"mlp.{h}", f"mlp.{o}", n) for h, o, n in _SWIGLU)
    for h, o, n in table:
        yield Entry(hf + h, ours + o, index, n)
    if moe:
        for e in range(n_experts):
            for h, o in _EXPERT:
                yield Entry(f"{hf}mlp.experts.{e}.{h}", ours + o, index + (e,), 1)


def hf_entries(cfg) -> list[Entry]:
    """Every HF tensor of a GLM-5 checkpoint for `cfg`, in the order transformers' layers hold them."""
    out = [Entry("model.embed_tokens.weight", "embed_tokens", (), None)]
    for g_i, group in enumerate(layer_groups(cfg)):
        for j, layer in enumerate(group.layers):
            out += _layer(f"model.layers.{layer}.", f"layers.{g_i}.", (j,), moe=group.moe, indexer=group.indexer,
                          n_experts=cfg.n_routed_experts)
    if cfg.has_mtp:
        prefix = f"model.layers.{cfg.num_hidden_layers}."
        out += _layer(prefix, "mtp.layer.", (), moe=True, indexer=True, n_experts=cfg.n_routed_experts)
        out += [Entry(prefix + h, o, (), n) for h, o, n in _MTP]
    out += [Entry("model.norm.weight", "norm.weight", (), None), Entry("lm_head.weight", "lm_head", (), 1)]
    return out
