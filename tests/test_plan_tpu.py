"""`glm5 plan --target tpu:...`: the train step compiled by libtpu's TPU compiler, on this CPU-only host.

Needs the `tpu` extra (`pip install -e '.[tpu]'`; `launch/setup_env.sh --test` installs it where libtpu has a
wheel for the interpreter). Skipped only when libtpu is not installed. The compiler has no persistent cache
for these compile-only targets, so the models are small: a 2-layer MoE model with expert parallelism on a
v5p-8 slice (4 chips), and a 1-layer model whose 200M-token vocabulary cannot fit 95 GiB.
"""

from __future__ import annotations

import pytest

from glm5_jax.plan import devices as plan_devices
from glm5_jax.plan import measure
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(not plan_devices.libtpu_installed(),
                                reason="libtpu is not installed (the tpu extra: pip install -e '.[tpu]')")

MOE = ["num_hidden_layers=2", "first_k_dense_replace=1", "num_nextn_predict_layers=0", "remat_policy=none"]
HUGE = ["num_hidden_layers=1", "first_k_dense_replace=1", "num_nextn_predict_layers=0", "remat_policy=none",
        "vocab_size=200000000"]


def test_tiny_step_compiles_for_v5p_8(capsys):
    """Expert 2 x data 2 on 4 v5p chips: the model picks the TPU kernels (ragged_dot, ragged_all_to_all)."""
    assert run_cli("plan", "--config", "tiny", "--target", "tpu:v5p-8", "--layout", "ep4-dp2",
                   "--layout-override", "mesh.expert=2", "--layout-override", "mesh.data=2", "--seq-len", 32,
                   *[a for o in MOE for a in ("--override", o)]) == 0
    out = capsys.readouterr().out
    assert "TPU compiler (tpu:v5p-8 = v5p:2x2x1; jax " in out and f"libtpu {_libtpu()}" in out
    assert "experts run ragged_dot, dispatch ragged as the model chooses for tpu devices" in out
    assert "95.74 GiB" in out and "fits (" in out and "DOES NOT FIT" not in out


def test_out_of_memory_is_the_verdict():
    target = plan_devices.parse_target("tpu:v5p-8")
    devices = plan_devices.tpu_devices(target)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    result = measure.run("tiny", HUGE, None, [], None, 16, None, plan_devices.device_memory(devices, target, None),
                      device_list=devices, target=target)
    assert not result.fits and result.memory.peak is None
    assert result.error.startswith("RESOURCE_EXHAUSTED") and "exceeds available HBM (95.74G)" in result.error
    assert result.memory.params > 2 * 200_000_000 * 64 * 4  # still the analytic split: embedding + head, replicated


def _libtpu() -> str:
    import importlib.metadata

    return importlib.metadata.version("libtpu")
