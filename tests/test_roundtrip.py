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
    kept = [k for k in tensors if k.endswith(("e_score_correction_bias", "indexer.weights_proj.weight"))]
    assert kept and all(tensors[k].dtype == np.float32 for k in kept)  # transformers keeps these in float32
    assert tensors["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    loaded, info = transformers.GlmMoeDsaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                       dtype=torch.float32)
    n = model.config.num_hidden_layers
    assert not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert not info["mismatched_keys"]
    sd = loaded.state_dict()
    for name, value in model.state_dict().items():
        float32 = name.endswith(("e_score_correction_bias", "indexer.weights_proj.weight"))
        want = value if float32 else value.to(torch.bfloat16).to(torch.float32)
        assert torch.equal(sd[name].to(torch.float32), want), name
    # so the loaded model computes exactly what the original computes with bfloat16-rounded weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("indexer.weights_proj.weight"):
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_our_checkpoint_exports_to_an_equal_transformers_model(tmp_path):
    """The other direction: a model initialised here, saved by Orbax (OCDBT), exported, run by transformers."""
    import jax.numpy as jnp

    from glm5_jax.checkpoint.store import load_model

    ckpt, out = tmp_path / "init", tmp_path / "hf"
    assert run_cli("init", "--config", "tiny", "--out", ckpt, "--seed", "3", "--override", "pad_token_id=null") == 0
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", out, "--dtype", "float32", "-q") == 0
    ours, cfg = load_model(str(ckpt))
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 3 * cfg.index_topk))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), mtp_depths=0).logits)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_export_reads_a_stored_chunk_once_for_all_its_slots(tmp_path):
    """A training checkpoint's chunk holds many slots (experts of a shard): the export reads each chunk-aligned
    block once and slices it, and falls back to slot reads past its size bound; both equal direct reads."""
    import tensorstore as ts

    from glm5_jax.convert.hf import _Blocks

    full = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4, 8, 3)
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}, "create": True,
            "metadata": {"shape": list(full.shape), "chunks": [2, 4, 3], "dtype": "<f4"}}
    array = ts.open(spec).result()
    array.write(full).result()
    for blocks in (_Blocks(), _Blocks(limit=8)):
        for i in range(4):
            for j in range(8):
                np.testing.assert_array_equal(blocks.slot("a", array, (i, j)), full[i, j])
        np.testing.assert_array_equal(blocks.slot("a", array, (3,)), full[3])
        np.testing.assert_array_equal(blocks.slot("a", array, ()), full)
    counting = _Blocks()
    reads = []
    read = counting.slot

    def spy(path, array, index):
        kept = set(counting._kept)
        out = read(path, array, index)
        reads.extend(set(counting._kept) - kept)
        return out

    for i in range(4):
        for j in range(8):
            spy("a", array, (i, j))
    assert len(reads) == 4  # one read per [2, 4] block of slots, not one per slot
