"""The train step (`glm5_jax.train.step.TrainStep`, the program `glm5 train` runs) for the layout tests.

They check what the step differentiates, with the loss terms they do not test switched off through the loss
config (`LM_ONLY`: main-head cross-entropy only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5_jax import optim
from glm5_jax.checkpoint.naming import flatten
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.sharding.layout import ParallelConfig
from glm5_jax.train import losses
from glm5_jax.train import step as S

LM_ONLY = losses.LossConfig(mtp_weight=0.0, balance_weight=0.0, bias_update_rate=0.0)


def one_device() -> Parallelism:
    return Parallelism.create(ParallelConfig(mesh={"data": 1}), jax.devices()[:1])


def model_cfg(state: S.ModelState):
    return nnx.merge(state.graphdef, state.params, state.buffers).cfg


def train_step(cfg, rows: int, seq: int, par=None, accumulate: int = 1, loss_cfg=LM_ONLY, trainable="all",
               opt=None) -> S.TrainStep:
    spec = S.StepConfig(cfg, loss_cfg, rows, seq, accumulate, trainable)
    return S.make_step(spec, par or one_device(), optim.from_dict(opt or {"matrix_optimizer": "adamw"}),
                       S.abstract_state(cfg))


def microbatches(batch: dict, accumulate: int) -> dict:
    """[B, L] rows -> [accumulate, B / accumulate, L]: microbatch a holds rows a, a + accumulate, ..."""
    return {k: v.reshape(v.shape[0] // accumulate, accumulate, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def loss_and_grads(state: S.ModelState, batch: dict, par=None, loss_cfg=LM_ONLY, accumulate: int = 1):
    """((loss, aux), grads as {dotted name: array}) of the train step on `batch` [B, L], in layout `par`, as
    host (NumPy) values, so results of different layouts compare directly."""
    B, L = batch["input_ids"].shape
    step = train_step(model_cfg(state), B // accumulate, L, par, accumulate, loss_cfg)
    params, buffers = flatten(state.params), flatten(state.buffers)
    return jax.device_get(step.loss_and_grads(params, buffers, microbatches(batch, accumulate)))


def compiled_loss_and_grads(state: S.ModelState, batch: dict, par=None, loss_cfg=LM_ONLY):
    """(compiled program, its arguments) of the step's loss and gradients, for HLO checks."""
    B, L = batch["input_ids"].shape
    step = train_step(model_cfg(state), B, L, par, 1, loss_cfg)
    args = (flatten(state.params), flatten(state.buffers), microbatches(batch, 1), jnp.int32(1))
    with use(step.par):
        return jax.jit(step._loss_and_grads).lower(*args).compile(), args


def two_document_batch(vocab_size: int, rows: int, length: int, split: int = 25, seed: int = 0) -> dict:
    """Random ids [rows, length] packed as two documents per row (positions restart at `split`; no target
    across the boundary): masks and RoPE positions must hold in every layout."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab_size, (rows, length + 1)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    segments[:, split:] = 2
    positions = np.concatenate([np.arange(split), np.arange(length - split)])[None].repeat(rows, 0)
    targets = ids[:, 1:].copy()
    targets[:, split - 1] = -1
    return dict(input_ids=ids[:, :-1], targets=targets, positions=positions.astype(np.int32), segment_ids=segments)
