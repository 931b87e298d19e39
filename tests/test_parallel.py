"""Every parallel layout gives the single-device loss and gradients; expert parallelism moves tokens, not weights.

8 simulated CPU devices (tests/conftest.py). float32 throughout; the bound is a relative error of 1e-5
per gradient leaf (norm of the difference over norm of the reference).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5_jax import config
from glm5_jax.errors import ConfigError
from glm5_jax.model import GLM5
from glm5_jax.model.layout_check import check_layout
from glm5_jax.sharding import expert
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.sharding.layout import ParallelConfig, load_layout
from glm5_jax.sharding.mesh import resolve_sizes
from glm5_jax.train import step as S
from tests.step_util import loss_and_grads, two_document_batch

B, L = 8, 40  # L > index_topk (16): the sparse attention path and the indexer run


@pytest.fixture(scope="module")
def setup():
    cfg = config.load("tiny", ["expert_matmul=tiled"])
    state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
    batch = two_document_batch(cfg.vocab_size, B, L)
    (loss, aux), grads = loss_and_grads(state, batch)
    return state, batch, loss, aux, grads


def max_relative_error(got, want):
    errors = [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) for g, w in
              zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    return max(errors)


def run_layout(setup, **layout):
    state, batch, *_ = setup
    # The ragged exchange runs emulated: XLA:CPU lacks ragged_all_to_all.
    par = dataclasses.replace(Parallelism.create(ParallelConfig(**layout)),
                              ragged_exchange=expert.emulated_ragged_all_to_all)
    (loss, aux), grads = loss_and_grads(S.place(state, par), batch, par)
    return loss, aux, grads


@pytest.mark.parametrize("layout", [
    dict(mesh=dict(data=8)),
    dict(mesh=dict(fsdp=4, tensor=2)),
    dict(mesh=dict(expert=4, data=2)),  # capacity all_to_all dispatch (CPU)
    dict(mesh=dict(expert=4, data=2), expert_dispatch="ragged"),  # ragged dispatch, exchange emulated
    dict(mesh=dict(context=2, expert=2, tensor=2)),
    dict(mesh=dict(expert=2, fsdp=2, tensor=2)),  # expert weights FSDP-gathered and tensor-reduced in the map
], ids=lambda d: "-".join(f"{k}{v}" for k, v in d["mesh"].items()) + ("-ragged" if "expert_dispatch" in d else ""))
def test_layout_matches_single_device(setup, layout):
    _, _, loss0, aux0, grads0 = setup
    loss, aux, grads = run_layout(setup, **layout)
    assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
    assert max_relative_error(grads, grads0) < 1e-5
    np.testing.assert_array_equal(aux["carry"]["expert_load"], aux0["carry"]["expert_load"])


@pytest.mark.parametrize("dispatch", ["capacity", "ragged"])
def test_capacity_bound_drops_and_counts(setup, dispatch):
    _, _, loss0, aux0, _ = setup
    loss, aux, grads = run_layout(setup, mesh=dict(expert=4, data=2), expert_dispatch=dispatch, capacity_factor=1.0)
    copies = B * L * 2  # tokens * num_experts_per_tok
    dropped = copies - np.asarray(aux["carry"]["expert_load"]).sum(axis=1)
    assert (np.asarray(aux0["carry"]["expert_load"]).sum(axis=1) == copies).all()  # dropless reference
    assert (dropped > 0).all() and (dropped < copies // 4).all()
    assert (np.asarray(aux["carry"]["expert_load"]) <= np.asarray(aux0["carry"]["expert_load"])).all()
    assert np.isfinite(float(loss)) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def _collectives(hlo: str, op: str):
    """Result shapes of every `op` instruction in an HLO module's text."""
    return re.findall(rf"= \(?(\w+\[[\d,]*\])[^=]*? {op}(?:-start)?\(", hlo)


def test_expert_parallel_program_moves_tokens_not_weights():
    cfg = config.load("tiny", ["expert_matmul=tiled"])
    from glm5_jax.model.moe import MoE

    moe = MoE(cfg, stack=None, rngs=nnx.Rngs(0))
    graphdef, params, buffers = nnx.split(moe, nnx.Param, ...)
    par = Parallelism.create(ParallelConfig(mesh=dict(expert=4, data=2)))
    x = jax.device_put(jnp.ones((B, L, cfg.hidden_size)), par.sharding(("batch", "length", "act_embed")))
    params = jax.device_put(params, S.state_shardings(params, par))

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, buffers)(x)
        return jnp.sum(y ** 2)

    with use(par):
        hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    assert _collectives(hlo, "all-to-all"), "tokens must travel by all-to-all"
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    weight_shapes = {f"[{E},{D},{F}]", f"[{E},{F},{D}]"}
    gathered = [s for s in _collectives(hlo, "all-gather") if s[s.index("["):] in weight_shapes]
    assert not gathered, f"expert weights all-gathered: {gathered}"
    # Each device keeps its 2 of the 8 experts: the expert weights enter the program as [2, D, F] shards.
    assert re.search(rf"\[{E // 4},{D},{F}\]", hlo)


def test_mesh_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^mesh: axis sizes .* multiply to 6, but there are 8 devices"):
        resolve_sizes({"data": 3, "tensor": 2}, 8)
    with pytest.raises(ConfigError, match=r"^mesh.tensr: unknown mesh axis"):
        resolve_sizes({"tensr": 2}, 8)
    with pytest.raises(ConfigError, match=r"^mesh: only one axis may be -1"):
        resolve_sizes({"data": -1, "fsdp": -1}, 8)
    assert resolve_sizes({"data": -1, "tensor": 2}, 8)["data"] == 4
    with pytest.raises(ConfigError, match=r"^expert_dispatch: must be one of auto, capacity, ragged"):
        load_layout(None, ["expert_dispatch=fast"])
    with pytest.raises(ConfigError, match=r"^rules.heads: must be null, a mesh axis"):
        load_layout(None, ["rules.heads=tensorr"])


def test_sharded_init_places_every_parameter():
    cfg = config.load("tiny")
    par = Parallelism.create(ParallelConfig(mesh=dict(fsdp=2, expert=2, tensor=2)))
    state = S.init_sharded(cfg, par, seed=3)
    reference = S.split(GLM5(cfg, rngs=nnx.Rngs(3)))
    for got, want, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params),
                                   jax.tree.leaves(S.state_shardings(reference.params, par)), strict=True):
        assert got.sharding == sharding
        # Same random draws; jit may fuse the std scaling differently from eager mode (1 ulp).
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)
    experts = state.params["layers"][1]["mlp"]["experts_gate"]
    assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert experts.addressable_shards[0].data.shape == (2, 4, 32, 16)


FOUR_AXES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from glm5_jax import config
from glm5_jax.model import GLM5
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.layout import load_layout
from glm5_jax.train import step as S
from tests.step_util import loss_and_grads

assert len(jax.devices()) == 16
cfg = config.load("tiny", ["num_hidden_layers=5", "first_k_dense_replace=1"])
state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
rng = np.random.default_rng(0)
ids = rng.integers(2, cfg.vocab_size, (8, 41)).astype(np.int32)
batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], positions=np.tile(np.arange(40, dtype=np.int32), (8, 1)),
             segment_ids=np.ones((8, 40), np.int32))
(loss0, aux0), grads0 = loss_and_grads(state, batch)
par = Parallelism.create(load_layout("pp2-ep2-tp2-dp2"))
assert {a: n for a, n in par.mesh.shape.items() if n > 1} == dict(pipeline=2, data=2, expert=2, tensor=2)
(loss, aux), grads = loss_and_grads(S.place(state, par), batch, par)
err = max(float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) for g, w in
          zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True))
assert abs(float(loss) - float(loss0)) <= 1e-5 * float(loss0), (loss, loss0)
assert err < 1e-5, err
np.testing.assert_array_equal(aux["carry"]["expert_load"], aux0["carry"]["expert_load"])
print(f"four axes: loss {float(loss):.6f} vs {float(loss0):.6f}, max grad rel err {err:.1e}")
"""


def test_pipeline_expert_tensor_data_at_once_on_16_devices(tmp_path):
    """pipeline 2 x expert 2 x tensor 2 x data 2 needs 16 devices: a child process simulates them."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
        "xla_force_host_platform_device_count=8", "xla_force_host_platform_device_count=16"))
    done = subprocess.run([sys.executable, "-c", FOUR_AXES], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "four axes: loss" in done.stdout


def test_context_shards_must_divide_the_sequence():
    par = Parallelism.create(ParallelConfig(mesh=dict(context=8)))
    with pytest.raises(ConfigError, match=r"^stages.0: seq_len 36 does not split into 8 context shards"):
        check_layout(config.load("tiny"), par, 8, 36, "stages.0")
