"""The MTP head against a direct implementation built from transformers' own decoder layer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

from glm5_jax.checkpoint.store import load_model

DEPTHS = 3


def torch_mtp_layer(model, tensors: dict[str, np.ndarray]):
    """transformers' MoE decoder layer loaded with the MTP layer's tensors (experts packed as it wants)."""
    cfg = model.config
    n = cfg.num_hidden_layers
    layer = transformers.models.glm_moe_dsa.modeling_glm_moe_dsa.GlmMoeDsaDecoderLayer(cfg, n - 1).eval()
    prefix = f"model.layers.{n}."
    state = {}
    for name in layer.state_dict():
        if name == "mlp.experts.gate_up_proj":
            state[name] = np.stack([np.concatenate([tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"],
                                                    tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"]])
                                    for e in range(cfg.n_routed_experts)])
        elif name == "mlp.experts.down_proj":
            state[name] = np.stack([tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"]
                                    for e in range(cfg.n_routed_experts)])
        else:
            state[name] = tensors[prefix + name]
    layer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return layer


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_logits_match_direct_implementation(hf_model_dir, convert):
    path, model = hf_model_dir(seed=8, mtp=True)
    tensors = load_file(f"{path}/model-00002-of-00002.safetensors")
    ckpt = convert(path)
    cfg = model.config
    n, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    layer = torch_mtp_layer(model, tensors)
    t = lambda name: torch.from_numpy(tensors[f"model.layers.{n}.{name}"])
    batch, length = 2, 27  # longer than index_topk: the MTP layer's attention is sparse too
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = model.model(ids).last_hidden_state  # final-normed hidden state of the main model
        pos = torch.arange(length)[None]
        rope = model.model.rotary_emb(h, pos)
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        want = []
        for k in range(1, DEPTHS + 1):
            ids_k = torch.cat([ids[:, k:], torch.zeros((batch, k), dtype=ids.dtype)], dim=1)
            e = model.model.embed_tokens(ids_k)
            x = torch.cat([rms(e, t("enorm.weight"), eps), rms(h, t("hnorm.weight"), eps)], -1) @ t("eh_proj.weight").T
            h, _ = layer(x, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            want.append(model.lm_head(rms(h, t("shared_head.norm.weight"), eps)).numpy())
    ours, _ = load_model(ckpt)
    out = ours(jnp.asarray(ids.numpy()), mtp_depths=DEPTHS)
    got = np.asarray(out.mtp_logits)
    assert got.shape == (DEPTHS, batch, length, cfg.vocab_size)
    want = np.stack(want)
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"MTP max abs err / max abs logit = {rel:.2e}")
    assert rel < 1e-4
    # depths differ from each other and from the main head
    assert not np.allclose(got[0], got[1], atol=1e-3)
    assert not np.allclose(got[0], np.asarray(out.logits), atol=1e-3)
