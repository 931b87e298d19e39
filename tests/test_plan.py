"""`glm5 plan`: ahead-of-time compile of the train step on simulated devices, memory and FLOPs figures.

8 simulated CPU devices (tests/conftest.py). The figures are checked against calculations that do not use
the plan's code: parameter bytes from the shapes, the mesh and the rules written out by hand, FLOPs from
XLA's cost analysis on a model with no loop that runs more than once.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from glm5_jax import config
from glm5_jax.plan import devices as plan_devices
from glm5_jax.plan import measure as plan_measure
from glm5_jax.plan import report as plan_report
from glm5_jax.model import GLM5
from tests.conftest import run_cli

# One dense layer, no MTP, no remat: the layer scan runs once and sequences of 16 (= index_topk) take the
# dense attention path, so no loop body stands for more than one trip and cost_analysis sees every FLOP.
ONE_DENSE_LAYER = ["num_hidden_layers=1", "first_k_dense_replace=1", "num_nextn_predict_layers=0",
                   "remat_policy=none", "hidden_size=128", "intermediate_size=384", "vocab_size=1024"]
# The CLI run uses the same model on fsdp 4 x tensor 2 (MoE and MTP stacks compile for minutes on 2 cores;
# tests/test_parallel.py covers their shardings).
SMALL = ONE_DENSE_LAYER


def param_shapes(overrides) -> list[tuple[tuple[int, ...], tuple[str, ...], int]]:
    """(shape, logical axes, itemsize) of every nnx.Param of the tiny model."""
    cfg = config.load("tiny", overrides)
    params = nnx.state(nnx.eval_shape(lambda: GLM5(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return [(v.shape, v.get_metadata()["logical_axes"], np.dtype(v.get_value().dtype).itemsize)
            for _, v in nnx.to_flat_state(params)]


def bytes_per_device(shapes, mesh_axis_of: dict[str, tuple[str, int]]) -> int:
    """Bytes of the largest shard per device: a dimension is divided by its mesh axis's size when the
    logical name maps to one, the size divides the dimension, and no earlier dimension used that axis."""
    total = 0
    for shape, axes, itemsize in shapes:
        used, local = set(), []
        for dim, name in zip(shape, axes, strict=True):
            axis, size = mesh_axis_of.get(name, (None, 1))
            if axis and axis not in used and dim % size == 0:
                used.add(axis)
                dim //= size
            local.append(dim)
        total += math.prod(local) * itemsize
    return total


FSDP4_TP2 = {"embed": ("fsdp", 4), **{n: ("tensor", 2) for n in ("vocab", "heads", "mlp", "expert_mlp",
                                                                   "index_heads")}}


@pytest.fixture(scope="module")
def dense_plan():
    assert len(jax.devices()) == 8
    return plan_measure.run("tiny", ONE_DENSE_LAYER, layout="dp8", devices=8, seq_len=16, global_batch=16)


def test_plan_cli_end_to_end(capsys):
    assert run_cli("plan", "--config", "tiny", "--layout", "fsdp4-tp2", "--devices", 8, "--seq-len", 32,
                   *[a for o in SMALL for a in ("--override", o)], "--device-memory", "1GB") == 0
    out = capsys.readouterr().out
    for text in ("per-device memory", "FLOPs per step", "temporaries", "XLA cost_analysis", "fsdp 4 x tensor 2",
                 "fits", "compile"):
        assert text in out, text
    # The printed per-device parameter bytes equal a calculation from the shapes and the mesh.
    printed = int(re.search(r"parameters .*?([\d,]+) B per device", out).group(1).replace(",", ""))
    assert printed == bytes_per_device(param_shapes(SMALL), FSDP4_TP2)


def test_param_bytes_match_shapes_and_mesh(dense_plan):
    shapes = param_shapes(ONE_DENSE_LAYER)
    m = dense_plan.memory
    assert m.params == m.params_total == bytes_per_device(shapes, {})  # data 8 replicates everything
    # XLA's argument buffers are exactly the analytic shards: params, optimizer state, router bias, batch.
    # + the microbatch count and the learning rate, 4 B each (the router-bias rate: no MoE layer reads it)
    assert m.argument == m.params + m.optimizer + m.buffers + m.batch + 8
    assert m.alias == m.params + m.optimizer + m.buffers  # all three donated
    assert dense_plan.fits and m.peak == m.argument + m.output - m.alias + m.temp


def test_analytic_flops_match_cost_analysis(dense_plan):
    """Nothing loops more than once here, so XLA counts what the formula counts plus elementwise work."""
    analytic = plan_report.per_device_total(dense_plan.flops)
    assert plan_report.loops_once(dense_plan.flops) == analytic
    ratio = dense_plan.xla_flops / analytic
    assert 1.0 <= ratio < 1.05, ratio  # measured 1.039: norms, softmax, optimizer elementwise on top
    names = [f.name for f in dense_plan.flops]
    assert "attention core (dense, full L x L)" in names and "Muon Newton-Schulz" in names


def test_bad_mesh_is_one_line_naming_the_key(capsys):
    assert run_cli("plan", "--config", "tiny", "--devices", 8, "--seq-len", 16, "--layout-override",
                   "mesh.data=3") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm5: error: mesh: axis sizes (data 3) multiply to 3, but there are 8 devices")
    assert "\n" not in err


def test_more_devices_than_this_process_has_runs_in_a_child(capfd):
    """16 devices in an 8-device process: the plan re-executes itself (here it fails fast on the batch)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli("plan", "--config", "tiny", "--devices", 16, "--layout", "pp2-ep2-tp2-dp2", "--seq-len", 16,
                "--global-batch", 3)
    assert exit_info.value.code == 2
    err = capfd.readouterr().err.strip()
    assert err.endswith("glm5: error: --global-batch: 3 rows per step as 1 microbatches do not split into 4 batch "
                        "shards x 4 pipeline microbatches; use a multiple of 16 rows")


def test_device_memory_sizes():
    size = lambda text: plan_devices.parse_bytes(text, "--device-memory")
    assert size("80GB") == 80 * 10**9 and size("80GiB") == 80 * 2**30
    assert size("1.5TB") == 1.5e12 and size("512") == 512
    with pytest.raises(config.ConfigError, match="^--device-memory: "):
        size("lots")


def test_tpu_product_names_map_to_topologies():
    """v5p-N counts TensorCores (2 per chip), v5e-N / v6e-N chips; GEN:TOPOLOGY passes through."""
    cases = {"tpu:v5p-8": "v5p:2x2x1", "tpu:v5p-16": "v5p:2x2x2", "tpu:v5p-128": "v5p:4x4x4",
             "tpu:v5p-512": "v5p:4x8x8", "tpu:v5p-1024": "v5p:8x8x8", "tpu:v5e-8": "v5e:2x4",
             "tpu:v6e-1": "v6e:1x1", "tpu:v6e-256": "v6e:16x16", "tpu:tpu7x:2x2x1": "tpu7x:2x2x1",
             "tpu:v5p:4x8x8": "v5p:4x8x8"}
    for name, topology in cases.items():
        target = plan_devices.parse_target(name)
        assert (target.platform, target.topology) == ("tpu", topology), name
    assert plan_devices.parse_target("cpu").platform == "cpu"


@pytest.mark.parametrize("target,message", [
    ("gpu", "--target: expected one of cpu, tpu:v5p-N (N TensorCores, 2 per chip), tpu:v5e-N / tpu:v6e-N (N chips), "
            "tpu:GEN:AxB[xC] (a topology libtpu knows, in chips: v5p:4x8x8, v6e:16x16, tpu7x:2x2x1), gpu:h100-N / "
            "gpu:h200-N (N GPUs: up to 8 on one host, else whole hosts of 8); got 'gpu'"),
    ("tpu:v5p-6", "--target: v5p-N counts TensorCores (2 per chip), at least 8; expected one of cpu, "),
    ("tpu:v6e-12", "--target: v6e-N counts chips, a power of two; expected one of cpu, "),
])
def test_bad_target_is_one_line(capsys, target, message):
    assert run_cli("plan", "--config", "tiny", "--target", target) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"glm5: error: {message}") and "\n" not in err, err


def test_tpu_target_takes_its_devices_and_memory_from_the_topology(capsys):
    assert run_cli("plan", "--config", "tiny", "--target", "tpu:v5p-8", "--devices", 4) == 2
    assert capsys.readouterr().err.strip() == ("glm5: error: --devices: the topology of --target tpu:v5p-8 gives "
                                               "the devices")
    with pytest.raises(config.ConfigError, match="^--device-memory: only for --target cpu"):
        plan_devices.device_memory([], plan_devices.parse_target("tpu:v5p-8"), "80GB")
