"""Float32 logits parity with transformers' GlmMoeDsaForCausalLM after conversion with the CLI."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from glm5_jax.checkpoint.store import load_model
from tests.conftest import run_cli

TOL = 1e-4  # max |ours - transformers| / max |logit|

CASES = {
    # sequence 40 > index_topk 16: sparse top-k active; n_group 2 / topk_group 1; 2 dense + 2 MoE layers
    "sparse-grouped": dict(overrides={}, seq=40),
    # IndexShare: shared layers reuse the previous full layer's top-k, across dense and MoE stacks
    "indexshare": dict(overrides=dict(num_hidden_layers=5, first_k_dense_replace=2,
                                      indexer_types=["full", "shared", "full", "shared", "shared"]), seq=37),
    # length <= index_topk: DSA is exactly dense attention; also 4 groups / keep 2, 3 MoE layers
    "dense-attention": dict(overrides=dict(index_topk=64, n_routed_experts=16, n_group=4, topk_group=2,
                                           num_experts_per_tok=4, first_k_dense_replace=1), seq=24),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, hf_model_dir, convert):
    spec = CASES[case]
    path, model = hf_model_dir(seed=len(case), **spec["overrides"])
    ckpt = convert(path)
    ids = torch.randint(0, model.config.vocab_size, (3, spec["seq"]), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    ours, _ = load_model(ckpt)
    out = np.asarray(ours(jnp.asarray(ids.numpy()), mtp_depths=0).logits)
    assert out.shape == ref.shape
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"{case}: max abs err / max abs logit = {rel:.2e}")
    assert rel < TOL
    assert not np.allclose(out[0], out[1], atol=1e-3), "rows of the batch must differ"


def test_forward_cli_writes_logits(hf_model_dir, convert, tmp_path):
    path, model = hf_model_dir(seed=3)
    ckpt = convert(path)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 33)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    assert run_cli("forward", "--checkpoint", ckpt, "--input-ids", tmp_path / "ids.npy",
                   "--output", tmp_path / "logits.npy") == 0
    logits = np.load(tmp_path / "logits.npy")
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert logits.dtype == np.float32 and logits.shape == ref.shape
    assert np.abs(logits - ref).max() / np.abs(ref).max() < TOL


def test_forward_cli_rejects_out_of_vocab_ids(hf_model_dir, convert, tmp_path, capsys):
    path, model = hf_model_dir(seed=4)
    ckpt = convert(path)
    np.save(tmp_path / "ids.npy", np.array([[1, 2, model.config.vocab_size]]))
    capsys.readouterr()
    assert run_cli("forward", "--checkpoint", ckpt, "--input-ids", tmp_path / "ids.npy",
                   "--output", tmp_path / "logits.npy") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ids must lie in [0, 160)" in err[0]
    assert not (tmp_path / "logits.npy").exists()
