"""Shared fixtures: tiny random transformers GLM-5 models saved with save_pretrained (the oracle)."""

from __future__ import annotations

import json
import os

# Eight simulated CPU devices for the parallel layouts; set before anything initialises JAX. Single-device
# tests run on the first device as usual.
# LLVM optimisation off: the tests' programs are tiny, and compiling them dominates the suite's time.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# The suite runs on CPU. With the tpu extra installed (libtpu, for `glm5 plan --target tpu:...`) JAX would
# otherwise try to open a TPU at start-up in every process (and its children), querying a metadata server.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32,
    q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=24, index_topk=16, index_head_dim=16,
    # 32 indexer heads: with few heads, keys whose every head is ReLU'd to 0 tie at the top-k boundary and
    # torch and XLA may break such ties differently (both selections are correct).
    index_n_heads=32, first_k_dense_replace=2, n_group=2, topk_group=1, eos_token_id=1,
    # No pad id: transformers zeroes the pad row of the embedding, and a zero input makes every index
    # score of that query 0, a total tie that torch and XLA may break differently.
    pad_token_id=None,
)


def build_hf_model(seed: int = 0, **overrides):
    """A random GlmMoeDsaForCausalLM whose norms and router biases are not at their trivial init."""
    cfg = transformers.GlmMoeDsaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.GlmMoeDsaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights move well off 1; the indexer's LayerNorm bias only a little, since a large
            # shared bias aligns all keys and drives many index scores to exactly ReLU's 0 (ties).
            if "norm" in name:
                p.add_((0.2 if name.endswith("weight") else 0.02) * torch.randn_like(p))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model


def add_mtp_shard(path: str, model, seed: int = 1):
    """Add an MTP layer (model.layers.N.*) as a second safetensors shard, as the GLM-5 release stores it.

    Its tensors are named from the transformers model's own last MoE layer, independently of glm5_jax.
    """
    from safetensors.numpy import load_file, save_file

    cfg = model.config
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    rng = np.random.default_rng(seed)
    main = load_file(os.path.join(path, "model.safetensors"))
    base = f"model.layers.{n - 1}."  # an MoE layer, as saved on disk (experts one by one)
    tensors = {}
    for name, value in main.items():
        if name.startswith(base):
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            tensors[f"model.layers.{n}." + name[len(base):]] = (
                offset + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"model.layers.{n}.{norm}.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    tensors[f"model.layers.{n}.eh_proj.weight"] = (0.05 * rng.standard_normal((d, 2 * d))).astype(np.float32)
    os.remove(os.path.join(path, "model.safetensors"))
    save_file(main, os.path.join(path, "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(tensors, os.path.join(path, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in main}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return tensors


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: (directory, torch model) of a saved random tiny GLM-5; mtp=True adds an MTP shard."""

    def make(seed=0, mtp=False, **overrides):
        model = build_hf_model(seed, **overrides)
        path = str(tmp_path / f"hf-{seed}-{len(os.listdir(tmp_path))}")
        model.save_pretrained(path)
        if mtp:
            add_mtp_shard(path, model)
        return path, model

    return make


def run_cli(*argv) -> int:
    from glm5_jax.cli import main

    return main([str(a) for a in argv])


@pytest.fixture
def convert(tmp_path):
    """Convert an HF directory with the CLI; returns the checkpoint path."""

    def run(hf_dir, name="ckpt"):
        out = tmp_path / name
        assert run_cli("convert", "hf-to-orbax", "--hf-dir", hf_dir, "--out", out, "-q") == 0
        return str(out)

    return run
