"""`glm5 plan --target gpu:...`: the train step compiled by XLA's GPU compiler, on this host without a GPU.

Needs the `gpu-plan` extra (jax's CUDA plugin, `pip install -e '.[gpu-plan]'`; `launch/setup_env.sh --test`
installs it). Skipped only when the plugin is not installed. A 2-layer MoE model with expert parallelism on
one host of 8 H100s, the verdict against a device memory it cannot fit, and the expert matmul the GPU
compiler makes of ragged_dot.
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
    """Expert 4 x data 2 on one host of 8 H100s: the model picks the tiled expert loop (the GPU compiler runs
    ragged_dot over every local expert) and ragged_all_to_all, and the verdict is against the GPU's 80 GB, or
    the memory given."""
    args = ["plan", "--config", "tiny", "--target", "gpu:h100-8", "--layout", "ep4-dp2", "--seq-len", 32,
            *[a for o in MOE for a in ("--override", o)]]
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    assert "GPU compiler (gpu:h100-8 = 1x1x8 slices x hosts x GPUs; jax " in out and "jax-cuda12-pjrt" in out
    assert "experts run tiled, dispatch ragged as the model chooses for gpu devices" in out
    assert "74.51 GiB" in out and "fits (" in out and "DOES NOT FIT" not in out
    assert run_cli(*args, "--device-memory", "1MB") == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert run_cli("plan", "--config", "tiny", "--target", "gpu:h100-8", "--devices", 8) == 2


@needs_plugin
def test_the_gpu_compiler_runs_ragged_dot_over_every_expert_and_the_tiled_loop_does_not():
    """Why `expert_matmul: auto` is tiled on GPUs (glm5_jax/model/moe.py): the gradient of the routed experts
    (512 token copies over 8 experts) compiled for one H100 multiplies every copy by all 8 experts' matrices
    with ragged_dot, and by its own expert's only in the tiled loop (tiles of 16 rows: at most one partial
    tile an expert). Should jax's GPU compiler gain a grouped kernel, the first bound fails: time to
    reconsider `auto`."""
    import jax
    import jax.numpy as jnp

    from glm5_jax import scopes
    from glm5_jax.accounting import compiled as hlo
    from glm5_jax.accounting import parts
    from glm5_jax.model.moe import grouped_experts

    T, k, D, F, E = 256, 2, 128, 64, 8
    sharding = jax.sharding.SingleDeviceSharding(gpus.gpu_devices("h100", 1)[0])
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    args = (spec((T, D)), spec((T, k), jnp.int32), spec((T, k), jnp.float32), spec((E, D, F)), spec((E, D, F)),
            spec((E, F, D)))
    active = 6 * T * k * 3 * D * F  # forward and backward of the three products, each copy through its expert

    def routed_flops(tile: int) -> float:
        loss = lambda x, idx, w, g, u, d: grouped_experts(x, idx, w, g, u, d, E, tile)[0].astype(jnp.float32).sum()
        step = jax.jit(jax.grad(loss, argnums=(0, 3, 4, 5)))
        text = step.trace(*args).lower(lowering_platforms=("cuda",)).compile().as_text()
        return parts.within(hlo.count_flops(text).by_scope, scopes.ROUTED_EXPERTS)

    ragged, tiled = routed_flops(0), routed_flops(16)
    print(f"routed experts: ragged_dot {ragged / active:.2f}x, tiled {tiled / active:.2f}x the active FLOPs")
    assert ragged >= 0.75 * E * active  # (7.1x measured on jax 0.10.2)
    assert active <= tiled <= 1.3 * active
