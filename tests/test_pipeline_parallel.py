"""Pipeline parallelism gives the single-device loss, gradients and expert loads; activations move by ppermute.

8 simulated CPU devices (tests/conftest.py). The model: tiny preset with 5 MoE layers (no dense ones, to keep
compiles small), so every layout leaves one remainder layer to run before the pipeline. float32;
the bound is a relative error of 1e-5 per gradient leaf (norm of the difference over norm of the reference).
Programs compile with XLA's backend optimisations off: the numbers are the same and compiling is twice as
fast on a busy CPU.
"""

from __future__ import annotations

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
from glm5_jax.model.transformer import LayerGroup, pipelined_group
from glm5_jax.sharding import pipeline
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.layout import ParallelConfig
from glm5_jax.train import step as S
from tests.step_util import compiled_loss_and_grads, loss_and_grads, two_document_batch

B, L = 8, 40  # L > index_topk (16): the indexer and the sparse attention run inside the stages


@pytest.fixture(scope="module")
def setup():
    cfg = config.load("tiny", ["expert_matmul=tiled", "num_hidden_layers=5", "first_k_dense_replace=0"])
    state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
    batch = two_document_batch(cfg.vocab_size, B, L)
    (loss, aux), grads = loss_and_grads(state, batch)
    return cfg, state, batch, loss, aux, grads


def max_relative_error(got, want):
    errors = [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) for g, w in
              zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    return max(errors)


@pytest.mark.parametrize("layout", [
    # 5 MoE layers: 1 before the pipeline, then 2 stages x 2 layers; microbatches > stages.
    {"mesh": {"pipeline": 2, "data": 2, "tensor": 2}, "microbatches": 4},
    # Circular: 1 layer before, then 2 stages x 2 repeats x 1 layer; the last stage's outputs wait at stage 0
    # for their next repeat (microbatches > stages); stage weights FSDP-sharded.
    {"mesh": {"pipeline": 2, "data": 2, "fsdp": 2}, "microbatches": 4, "pipeline_repeats": 2},
    # 4 stages x 1 layer after 1 remainder layer.
    {"mesh": {"pipeline": 4, "data": 2}, "microbatches": 4},
], ids=lambda d: "-".join(f"{k}{v}" for k, v in d["mesh"].items()) + f"-mb{d['microbatches']}"
   + (f"-repeats{d['pipeline_repeats']}" if "pipeline_repeats" in d else ""))
def test_pipeline_matches_single_device(setup, layout):
    _, state, batch, loss0, aux0, grads0 = setup
    par = Parallelism.create(ParallelConfig(**layout))
    placed = S.place(state, par)
    program, args = compiled_loss_and_grads(placed, batch, par)
    (loss, aux), grads = program(*args)
    assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
    assert max_relative_error(grads, grads0) < 1e-5
    np.testing.assert_array_equal(aux["carry"]["expert_load"], aux0["carry"]["expert_load"])  # fill/drain iterations count nothing
    # Activations travel between stages by collective-permute: each stage's microbatch block [1, rows, L, D].
    hlo = program.as_text()
    permuted = re.findall(r"= \(?f32\[([\d,]*)\][^=]*? collective-permute(?:-start)?\(", hlo)
    assert any(re.fullmatch(rf"1,\d+,{L},\d+", shape) for shape in permuted), permuted  # [stage, rows, L, D]


def test_layout_errors_are_raised_before_tracing(setup):
    cfg = setup[0]
    for layout, message in [
        ({"mesh": {"pipeline": 4, "data": 2}, "microbatches": 2}, r"^microbatches: .* got microbatches 2 for 4 stages"),
        ({"mesh": {"pipeline": 2, "data": 4}, "microbatches": 3},
         r"^layout: 8 rows per step as 1 microbatches do not split into 4 batch shards x 3 pipeline microbatches"),
        ({"mesh": {"pipeline": 4, "data": 2}, "microbatches": 4, "pipeline_repeats": 2},
         r"^pipeline_repeats: the pipelined group has 5 layers, fewer than stages x repeats = 4 x 2"),
        ({"mesh": {"pipeline": 2, "expert": 2, "data": 2}, "microbatches": 2},
         r"^expert_matmul: 'tiled' does not run under pipeline x expert parallelism"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_layout(cfg, Parallelism.create(ParallelConfig(**layout)), B, L)


def test_placement_rule():
    glm5 = [LayerGroup(0, 3, moe=False, indexer=True), LayerGroup(3, 75, moe=True, indexer=True)]
    assert pipelined_group(glm5) == 1  # the 75 MoE layers
    par = Parallelism.create(ParallelConfig(mesh={"pipeline": 4, "data": 2}, microbatches=8))
    # 4 stages: 3 MoE layers run before the pipeline with the dense ones, then 4 x 18.
    assert pipeline.chunks(75, par) == pipeline.Chunks(stages=4, repeats=1, microbatches=8, before=3, per_chunk=18)
    par = Parallelism.create(ParallelConfig(mesh={"pipeline": 2, "data": 4}, microbatches=4, pipeline_repeats=3))
    assert pipeline.chunks(75, par) == pipeline.Chunks(stages=2, repeats=3, microbatches=4, before=3, per_chunk=12)
    # A 'full' pipelined group whose top-k a later 'shared' layer would need is refused.
    cfg = config.load("tiny", ["mlp_layer_types=[dense, sparse, sparse, dense]",
                               "indexer_types=[full, full, full, shared]"])
    par = Parallelism.create(ParallelConfig(mesh={"pipeline": 2, "data": 4}, microbatches=4))
    with pytest.raises(ConfigError, match=r"^layout: layers after the pipelined group"):
        check_layout(cfg, par, 16, 32)
