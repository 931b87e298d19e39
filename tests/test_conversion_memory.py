"""Conversion streams: peak memory stays far below the model size, in both directions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import psutil
from safetensors.numpy import save_file

from glm5_jax import config
from glm5_jax.checkpoint.store import abstract_leaves
from glm5_jax.convert.names import hf_entries

# ~0.9 GB of float32 tensors: 3 MoE layers + MTP with 64 experts, a 16K vocabulary.
BIG = ["vocab_size=16384", "hidden_size=512", "intermediate_size=2048", "moe_intermediate_size=512",
       "num_hidden_layers=4", "first_k_dense_replace=1", "num_attention_heads=8", "num_key_value_heads=8",
       "q_lora_rank=256", "kv_lora_rank=128", "qk_nope_head_dim=64", "qk_rope_head_dim=32", "v_head_dim=64",
       "n_routed_experts=64", "num_experts_per_tok=4", "n_group=1", "topk_group=1", "index_head_dim=64",
       "index_n_heads=8"]


def write_hf_dir(path: str, cfg, shard_bytes: int = 100 << 20) -> int:
    """A random HF directory for cfg, written shard by shard; returns the bytes of all tensors."""
    os.makedirs(path)
    leaves = abstract_leaves(cfg)
    rng = np.random.default_rng(0)
    shard, used, total, files = {}, 0, 0, []

    def flush():
        nonlocal shard, used
        files.append(f"part-{len(files)}.safetensors")
        save_file(shard, os.path.join(path, files[-1]), metadata={"format": "pt"})
        shard, used = {}, 0

    weight_map = {}
    for e in hf_entries(cfg):
        shape = e.hf_shape(leaves[e.path].shape[len(e.index):])
        shard[e.hf] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        weight_map[e.hf] = f"part-{len(files)}.safetensors"
        used += shard[e.hf].nbytes
        total += shard[e.hf].nbytes
        if used > shard_bytes:
            flush()
    if shard:
        flush()
    json.dump({"weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    config.save_hf_config(cfg, os.path.join(path, "config.json"))
    return total


def peak_rss_of(argv: list[str]) -> int:
    """Run a command and return its peak resident set size in bytes (sampled every 10 ms)."""
    proc = psutil.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        try:
            proc.wait(0.01)
        except psutil.TimeoutExpired:
            pass
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    return peak


def test_conversion_peak_memory_is_bounded(tmp_path):
    cfg = config.load("tiny", BIG)
    size = write_hf_dir(str(tmp_path / "hf"), cfg)
    largest = max(math.prod(s.shape) * 4 for s in abstract_leaves(cfg).values())
    glm5 = [sys.executable, "-m", "glm5_jax.cli"]
    # What any glm5 process holds before touching a tensor: libraries, the XLA CPU client, the abstract model.
    baseline = peak_rss_of([sys.executable, "-c", "import glm5_jax.convert.hf as h, jax; jax.numpy.zeros(1); "
                            f"from glm5_jax import config as c; h.abstract_leaves(c.load('tiny', {BIG!r}))"])
    to_orbax = peak_rss_of(glm5 + ["convert", "hf-to-orbax", "--hf-dir", str(tmp_path / "hf"), "--out",
                                   str(tmp_path / "ckpt"), "-q"])
    to_hf = peak_rss_of(glm5 + ["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                                str(tmp_path / "back"), "--dtype", "float32", "-q"])
    mb = lambda b: f"{b / 2**20:.0f} MiB"
    print(f"\nmodel {mb(size)} (largest stacked array {mb(largest)}); bare process {mb(baseline)}; "
          f"peak RSS hf-to-orbax {mb(to_orbax)}, orbax-to-hf {mb(to_hf)}")
    # What conversion adds to a bare process is a small fraction of the model (one input file mapped at
    # a time, one tensor in flight). The bare process itself is no measure of conversion: it is what the
    # installed libraries load (jax's CUDA plugin, when installed, adds ~120 MiB to every process).
    assert to_orbax - baseline < size / 4 and to_hf - baseline < size / 4
