"""The one train step: `glm5 plan` compiles the program `glm5 train` runs; gradient accumulation equals one big
batch (loss, every gradient, parameters after the update, router bias, expert loads) on one device and in
parallel layouts; the batch-size ramp's rows per step follow its schedule with one compiled program.

8 simulated CPU devices (tests/conftest.py), float32.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from glm5_jax import config
from glm5_jax.plan import measure as plan_measure
from glm5_jax.checkpoint.naming import flatten
from glm5_jax.data import config as data_config
from glm5_jax.data.loader import DataPipeline
from glm5_jax.data.stages import BatchRamp
from glm5_jax.model import GLM5
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.layout import ParallelConfig
from glm5_jax.train import losses
from glm5_jax.train import recipe as recipe_lib
from glm5_jax.train import step as S
from glm5_jax.train.setup import resolve
from glm5_jax.train.trainer import Programs
from tests.step_util import microbatches, one_device, train_step, two_document_batch

B, L = 16, 40  # L > index_topk (16): sparse attention and the indexer run


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ---------------------------------------------------------------------------------------------------------
# The planned program is the trained program
# ---------------------------------------------------------------------------------------------------------

def _trainer_program(recipe):
    """The trainer's path: the recipe resolved into stage settings, the stage's step as `glm5 train` makes it."""
    run = resolve(recipe)
    stage = run.stages[0]
    return stage, Programs(run, S.abstract_state(run.model_cfg, recipe.seed), print).make(stage)


def _trained_program(recipe):
    stage, program = _trainer_program(recipe)
    return stage, program.lower().compile()


def _stats(compiled):
    m = compiled.memory_analysis()
    return plan_measure.xla_flops(compiled), int(m.temp_size_in_bytes), int(m.argument_size_in_bytes)


@pytest.mark.parametrize("name,layout", [("tiny", {"mesh": {"data": 8}}),
                                         ("quickstart-layout", {"mesh": {"pipeline": 2, "expert": 2, "tensor": 2},
                                                                "microbatches": 2})])
def test_plan_compiles_the_trained_step(name, layout):
    # The tiny preset, 3 layers so both compiles stay short; the recipe's losses (MTP, balance, bias update).
    model = {"num_hidden_layers": 3, "first_k_dense_replace": 1}
    recipe = recipe_lib.from_dict({
        "model": "tiny", "model_overrides": model, "layout_overrides": layout, "data": "default",
        "data_overrides": {"stages.0.seq_len": 32, "stages.0.tokens_per_step": 512}, "accumulate": 2,
        "losses": {"mtp_weight": 0.3, "balance_weight": 1e-4, "bias_update_rate": 1e-3},
        "stages": [{"name": "short", "steps": 4}]})
    stage, trained = _trained_program(recipe)
    assert stage.step.accumulate == 2 and stage.step.rows == 8
    # glm5 plan's path: the same model, layout, batch, accumulation and losses given as its arguments.
    result = plan_measure.run("tiny", [f"{k}={v}" for k, v in model.items()], None,
                      [f"mesh.{k}={v}" for k, v in layout["mesh"].items()] +
                      [f"microbatches={layout.get('microbatches', 1)}"], 8, 32, 16, "80GB",
                      accumulate=2, loss_overrides=["mtp_weight=0.3", "balance_weight=1e-4", "bias_update_rate=1e-3"])
    planned = plan_measure.compile_step(result.inputs).compiled
    assert _stats(planned) == _stats(trained)
    assert result.memory.temp == _stats(trained)[1]


# ---------------------------------------------------------------------------------------------------------
# Accumulation equals one big batch
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_batch():
    cfg = config.load("tiny", ["expert_matmul=tiled"])
    state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
    batch = two_document_batch(cfg.vocab_size, B, L)
    batch["segment_ids"][3, 30:] = 0  # padding in one row
    batch["targets"][3, 29:] = -1
    return cfg, state, batch


def _train_once(cfg, state, batch, par, accumulate):
    """One optimizer step of the full GLM-5 loss (MTP 3 depths, balance, z, router bias) with Muon-Split."""
    loss_cfg = losses.LossConfig(z_loss=1e-3, mtp_weight=0.3, balance_weight=1e-2, bias_update_rate=1e-2)
    step = train_step(cfg, B // accumulate, L, par, accumulate, loss_cfg, opt={})
    # Host copies placed anew: the step donates its inputs, and the fixture's arrays must survive it.
    params = jax.device_put(jax.device_get(flatten(state.params)), step.param_shardings)
    buffers = jax.device_put(jax.device_get(flatten(state.buffers)), step.buffer_shardings)
    (loss, aux), grads = step.loss_and_grads(params, buffers, microbatches(batch, accumulate))
    opt_state = step.init_optimizer(params)
    new_params, new_buffers, _, metrics = step(params, buffers, opt_state, microbatches(batch, accumulate), accumulate,
                                            1e-2, 1e-2)
    return jax.device_get((loss, aux, grads, new_params, new_buffers, metrics))


LAYOUTS = [None, {"mesh": {"expert": 2, "data": 2, "tensor": 2}},
           {"mesh": {"pipeline": 2, "data": 2, "tensor": 2}, "microbatches": 2}]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["one-device", "expert2-data2-tensor2", "pipeline2-data2-tensor2"])
def test_accumulation_equals_one_big_batch(model_and_batch, layout):
    cfg, state, batch = model_and_batch
    par = one_device() if layout is None else Parallelism.create(ParallelConfig(**layout))
    loss1, aux1, grads1, params1, rest1, m1 = _train_once(cfg, state, batch, par, 1)
    loss4, aux4, grads4, params4, rest4, m4 = _train_once(cfg, state, batch, par, 4)
    assert rel(loss4, loss1) < 1e-6 and rel(m4["loss"], m1["loss"]) < 1e-6
    for k in ("lm", "mtp", "balance", "z"):
        assert rel(aux4["metrics"][k], aux1["metrics"][k]) < 1e-6, k
    assert float(aux1["metrics"]["mtp"]) > 0 and aux1["carry"]["expert_load"].shape[0] == 3  # 2 MoE layers + MTP's row
    np.testing.assert_array_equal(aux4["carry"]["expert_load"], aux1["carry"]["expert_load"])
    assert int(aux4["tokens"]) == int(aux1["tokens"]) == int((batch["targets"] >= 0).sum())
    assert max(rel(grads4[k], grads1[k]) for k in grads1) < 1e-6
    before = jax.device_get(flatten(state.params))
    still = {k for k in params1 if rel(params1[k], before[k]) == 0}
    assert len(still) < len(params1) // 10 and all(not np.any(grads1[k]) for k in still)  # no gradient: unmoved
    assert max(rel(params4[k], params1[k]) for k in params1) < 1e-6  # every update the same
    for k in rest1:
        np.testing.assert_array_equal(rest4[k], rest1[k])  # router bias: one update from the summed loads
    assert any(rel(rest1[k], jax.device_get(flatten(state.buffers))[k]) > 0 for k in rest1)


def test_count_below_accumulate_uses_only_the_first_microbatches(model_and_batch):
    """The batch ramp's traced count: count 2 of a 4-microbatch buffer is the step over those 2 alone."""
    cfg, state, batch = model_and_batch
    half = {k: v[:B // 2] for k, v in batch.items()}
    params, buffers = flatten(state.params), flatten(state.buffers)
    ref = train_step(cfg, B // 4, L, accumulate=2).loss_and_grads(params, buffers, microbatches(half, 2))
    # A 4-microbatch buffer: the half batch's two microbatches, then two of garbage that count 2 never reads.
    two = microbatches(half, 2)
    garbage = {k: np.full_like(v, 7) for k, v in two.items()}
    buffer = {k: np.concatenate([two[k], garbage[k]]) for k in two}
    got = train_step(cfg, B // 4, L, accumulate=4).loss_and_grads(params, buffers, buffer, 2)
    assert rel(got[0][0], ref[0][0]) < 1e-6
    assert max(rel(got[1][k], ref[1][k]) for k in ref[1]) < 1e-6
    np.testing.assert_array_equal(got[0][1]["carry"]["expert_load"], ref[0][1]["carry"]["expert_load"])


# ---------------------------------------------------------------------------------------------------------
# The batch ramp
# ---------------------------------------------------------------------------------------------------------

def test_ramp_rows_follow_the_schedule():
    """GLM-5's ramp shape at toy scale: tokens per step 1/4 -> all of tokens_per_step over the first budget."""
    cfg = data_config.load("default", {"stages.0.seq_len": 32, "stages.0.tokens_per_step": 1024,
                                       "stages.0.tokens": 60_000,
                                       "stages.0.batch_ramp": {"start_tokens_per_step": 256, "tokens": 20_000}})
    pipe = DataPipeline(cfg, 0, 1, accumulate={cfg.stages[0].name: 8})  # microbatches of 4 rows (128 tokens)
    stage = pipe.schedule.stages[0]
    assert (stage.accumulate, stage.micro_rows) == (8, 4)
    counts = [stage.count(s) for s in range(stage.steps)]
    assert counts[0] == 2 and counts[-1] == 8 and counts == sorted(counts)
    # The rule, step by step: count = round(target / microbatch), target linear in the tokens consumed.
    consumed = 0
    for s, n in enumerate(counts):
        target = 256 + (1024 - 256) * min(consumed / 20_000, 1)
        assert n == max(1, int(np.floor(target / 128 + 0.5))), s
        assert stage.tokens_before(s) == consumed
        consumed += n * 128
    assert consumed <= 60_000 < consumed + 8 * 128  # the budget's steps, not one more
    it = pipe.iterator(0)
    rows = [len(next(it)["input_ids"]) for _ in range(12)]
    it.close()
    assert rows == [4 * n for n in counts[:12]]
    # A restarted iterator at step 7 delivers what the uninterrupted one delivered there.
    a, b = pipe.iterator(0), pipe.iterator(7)
    for _ in range(7):
        next(a)
    x, y = next(a), next(b)
    a.close(), b.close()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_glm5_recipe_runs_the_ramp_in_one_stage():
    r = recipe_lib.load("glm5")
    dcfg = data_config.load(r.data)
    first = dcfg.stages[0]
    assert first.name == r.stages[0].name == "pretrain_general" and first.seq_len == 4096
    assert first.tokens_per_step == 64 * 2**20 and first.batch_ramp == {"start_tokens_per_step": 16 * 2**20,
                                                                         "tokens": 500 * 10**9}
    assert not any(s.name == "pretrain_warmup" for s in dcfg.stages)


def test_batch_size_warmup():
    # GLM-5: 16M -> 64M tokens per step over the first 500B tokens, here with 4M-token microbatches.
    m = 4 * 2**20
    ramp = BatchRamp(m, 16 * 2**20, 64 * 2**20, 500 * 10**9)
    counts = [n for _, n, _ in ramp.table]
    assert counts == list(range(4, 17))  # 16M / 4M .. 64M / 4M, one row per count
    # Against a step-by-step simulation of the rule.
    step, consumed, checked = 0, 0, 0
    while consumed < 520 * 10**9:
        target = 16 * 2**20 + 48 * 2**20 * min(consumed / (500 * 10**9), 1)
        n = max(1, math.floor(target / m + 0.5))
        if step % 97 == 0 or n != ramp.accumulation_steps(step):
            assert ramp.accumulation_steps(step) == n, step
            assert ramp.tokens_before(step) == consumed, step
            checked += 1
        consumed += n * m
        step += 1
    assert checked > 100 and ramp.accumulation_steps(10**9) == 16
    flat = BatchRamp(8, 16, 16, 100)
    assert flat.table == ((0, 2, 0),) and flat.tokens_before(5) == 80


# ---------------------------------------------------------------------------------------------------------
# One step builder: what `glm5 train` runs is what `glm5 plan --recipe` compiles
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("losses_cfg,trainable", [({"mtp_weight": 0.3, "bias_update_rate": 1e-3}, "all"),
                                                  ({"dsa": "warmup", "mtp_weight": 0.0}, "indexer"),
                                                  ({"dsa": "sparse_adapt", "mtp_weight": 0.3}, "all"),
                                                  ({"dsa": "dense", "mtp_weight": 0.3}, "no_indexer")])
def test_train_and_plan_lower_the_same_program(losses_cfg, trainable):
    """A pretraining stage and the DSA stages: the trainer's program and `glm5 plan`'s for the recipe's stage
    lower to the same text (seq 32 > index_topk 16: the sparse path runs; > attention_query_block 16: dense
    mode runs its blocks)."""
    from glm5_jax.plan.stages import stage_program

    recipe = recipe_lib.from_dict({
        "model": "tiny", "model_overrides": {"num_hidden_layers": 3, "first_k_dense_replace": 1},
        "layout_overrides": {"mesh": {"data": 2, "expert": 2, "tensor": 2}}, "data": "default",
        "data_overrides": {"stages.0.seq_len": 32, "stages.0.tokens_per_step": 512}, "accumulate": 2,
        "stages": [{"name": "short", "steps": 2, "trainable": trainable, "losses": losses_cfg}]})
    _, trained = _trainer_program(recipe)
    _, _, planned = stage_program(recipe, 0, None)
    assert trained.spec == planned.spec
    assert trained.lower().as_text() == planned.lower().as_text()
