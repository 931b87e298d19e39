"""HF -> Orbax -> HF gives back every tensor bit for bit, and the export loads in transformers."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

from tests.conftest import run_cli


def read_dir(path: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def test_roundtrip_is_bit_identical_with_mtp(hf_model_dir, convert, tmp_path):
    src, model = hf_model_dir(seed=5, mtp=True)
    ckpt = convert(src)
    out = tmp_path / "export"
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", out, "--dtype", "float32",
                   "--max-shard-size", "200KB", "-q") == 0
    before, after = read_dir(src), read_dir(str(out))
    assert sorted(before) == sorted(after)
    n = model.config.num_hidden_layers
    assert any(k.startswith(f"model.layers.{n}.") for k in after), "MTP layer must be exported"
    for name, value in before.items():
        assert after[name].dtype == value.dtype and np.array_equal(after[name], value), name
    # sharded: an index names every tensor's file, and files hold what it says
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    for name, file in index["weight_map"].items():
        assert name in load_file(str(out / file))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in after.values())


def test_export_loads_in_transformers(hf_model_dir, convert, tmp_path):
    src, model = hf_model_dir(seed=6, mtp=True)
    ckpt = convert(src)
    out = tmp_path / "export"
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", out, "-q") == 0  # bfloat16
    tensors = read_dir(str(out))
    bias = [k for k in tensors if k.endswith("e_score_correction_bias")]
    assert bias and all(tensors[k].dtype == np.float32 for k in bias)
    assert tensors["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    loaded, info = transformers.GlmMoeDsaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                       dtype=torch.float32)
    n = model.config.num_hidden_layers
    assert not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert not info["mismatched_keys"]
    sd = loaded.state_dict()
    for name, value in model.state_dict().items():
        want = value if name.endswith("e_score_correction_bias") else value.to(torch.bfloat16).to(torch.float32)
        assert torch.equal(sd[name].to(torch.float32), want), name
    # so the loaded model computes exactly what the original computes with bfloat16-rounded weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
        assert torch.equal(loaded(ids).logits, model(ids).logits)
