"""`glm5 plan --target gpu:...`: the train step compiled by XLA's GPU compiler, on this host without a GPU.

Needs the `gpu-plan` extra (jax's CUDA plugin, `pip install -e '.[gpu-plan]'`; `launch/setup_env.sh --test`
installs it). Skipped only when the plugin is not installed. A 2-layer MoE model with expert parallelism on
one host of 8 H100s, and the verdict against a device memory it cannot fit.
"""

from __future__ import annotations

import pytest

from glm5_jax.errors import ConfigError
from glm5_jax.plan import devices as plan_devices
from glm5_jax.plan import gpus
from tests.conftest import run_cli

needs_plugin = pytest.mark.skipif(gpus.plugin_version() is None,
                                  reason="jax's CUDA plugin is not installed (the gpu-plan extra)")

MOE = ["num_hidden_layers=2", "first_k_dense_replace=1", "num_nextn_predict_layers=0", "remat_policy=none"]


def test_gpu_targets_by_name():
    assert plan_devices.parse_target("gpu:h100-256").topology == "h100:256"
    assert gpus.topology(256) == "1x32x8" and gpus.topology(4) == "1x1x4"
    for bad, why in (("gpu:h100-12", "1 to 8 on one host, else a multiple of 8"), ("gpu:a100-8", "unknown GPU 'a100'"),
                     ("gpu:h100-0", "1 to 8 on one host")):
        with pytest.raises(ConfigError, match=why):
            plan_devices.parse_target(bad)
    text = gpus.target_config(gpus.GPUS["h200"])
    assert "device_memory_size: 141000000000" in text and 'device_description_str: "NVIDIA H200"' in text


@needs_plugin
def test_tiny_step_compiles_for_8_h100s(capsys):
    """Expert 4 x data 2 on one host of 8 H100s: the model picks the GPU kernels (ragged_dot, ragged_all_to_all)
    and the verdict is against the GPU's 80 GB, or the memory given."""
    args = ["plan", "--config", "tiny", "--target", "gpu:h100-8", "--layout", "ep4-dp2", "--seq-len", 32,
            *[a for o in MOE for a in ("--override", o)]]
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    assert "GPU compiler (gpu:h100-8 = 1x1x8 slices x hosts x GPUs; jax " in out and "jax-cuda12-pjrt" in out
    assert "experts run ragged_dot, dispatch ragged as the model chooses for gpu devices" in out
    assert "74.51 GiB" in out and "fits (" in out and "DOES NOT FIT" not in out
    assert run_cli(*args, "--device-memory", "1MB") == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert run_cli("plan", "--config", "tiny", "--target", "gpu:h100-8", "--devices", 8) == 2
