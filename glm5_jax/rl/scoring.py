"""Scoring rollouts: the batches RL trains on (`to_batch`) and the jitted per-token log-probs of a layout
(`Scorer`), which both the rollout engine (recorded log-probs) and the trainer (its pi_old) compute with, so
that on one layout and dtype the two agree bit for bit (docs/post-training.md, "Log-prob parity").
"""

from __future__ import annotations

import jax
import numpy as np

from glm5_jax.checkpoint.naming import flatten, to_state
from glm5_jax.errors import ConfigError
from glm5_jax.model.state import abstract_state, state_shardings
from glm5_jax.rl.logprobs import state_logprobs
from glm5_jax.sharding.context import Parallelism, use

BASE_FIELDS = ("input_ids", "targets", "positions", "segment_ids")
BATCH_AXES = ("batch", "length")


class Scorer:
    """`scorer(params, buffers, batch) -> logp [B, L] np.float32`: `state_logprobs` at `temperature` in the
    layout `par`, jitted once per batch shape.

    params / buffers: the model's {dotted name: array} (the trainer's flat dicts), moved into this layout's
    shardings if they are elsewhere; batch: the train step's base fields, each [B, L] int32. Rows are padded
    to a multiple of the layout's batch shards and columns to its sequence shards, with inert padding."""

    def __init__(self, model_cfg, par: Parallelism, temperature: float):
        if not temperature > 0:
            raise ConfigError(f"temperature: must be > 0 to score samples; got {temperature}")
        self.abstract = abstract = abstract_state(model_cfg)  # (the model's structure; the engine's decoder too)
        self.par, self.temperature = par, temperature
        self.param_shardings = flatten(state_shardings(abstract.params, par))
        self.buffer_shardings = flatten(state_shardings(abstract.buffers, par))

        def score(params, buffers, batch):
            return state_logprobs(to_state(params, abstract.params), to_state(buffers, abstract.buffers),
                                  abstract.graphdef, batch, temperature)[0]

        self._score = jax.jit(score)

    @property
    def compiles(self) -> int:
        """Programs compiled so far (one per batch shape)."""
        return self._score._cache_size()

    def __call__(self, params: dict, buffers: dict, batch: dict) -> np.ndarray:
        B, L = batch["input_ids"].shape
        rows, cols = -B % self.par.axis_size("batch"), -L % self.par.axis_size("length")
        fill = {"targets": -1}  # padding: input 0, position 0, segment 0 (seen by nothing), target not scored
        padded = {k: np.pad(np.asarray(batch[k], np.int32), ((0, rows), (0, cols)), constant_values=fill.get(k, 0))
                  for k in BASE_FIELDS}
        sharding = self.par.sharding(BATCH_AXES, padded["input_ids"].shape)
        with use(self.par):
            logp = self._score(jax.device_put(params, self.param_shardings),
                               jax.device_put(buffers, self.buffer_shardings),
                               {k: jax.device_put(v, sharding) for k, v in padded.items()})
        return np.asarray(jax.device_get(logp), np.float32)[:B, :L]


def to_batch(samples, seq_len: int, rows: int, accumulate: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The train step's batch [accumulate, rows, seq_len] of rollout samples (`glm5_jax.rl.rollout.Sample`).

    Sample i fills row i % rows of microbatch i // rows: input_ids = tokens[:-1], targets = tokens[1:] where
    the token is trained (else -1), positions 0.., segment_ids 1; the rest of the row is padding (pad_id,
    target -1, position 0, segment 0). `rollout_logp` (float32) holds the recorded log-prob of each target,
    0 where none. A sample with a `failure` trains nothing (all targets -1); rows past the samples are
    padding. More samples than rows * accumulate, or a sample longer than seq_len: ConfigError."""
    capacity = rows * accumulate
    if len(samples) > capacity:
        raise ConfigError(f"to_batch: {len(samples)} samples do not fit {accumulate} x {rows} rows")
    shape = (capacity, seq_len)
    out = {"input_ids": np.full(shape, pad_id, np.int32), "targets": np.full(shape, -1, np.int32),
           "positions": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32),
           "rollout_logp": np.zeros(shape, np.float32)}
    for i, s in enumerate(samples):
        n = len(s.tokens)
        if n > seq_len:
            raise ConfigError(f"to_batch: sample {s.sample_id} has {n} tokens, longer than seq_len {seq_len}")
        trained = s.trained[1:] & (s.failure is None)
        out["input_ids"][i, :n - 1] = s.tokens[:-1]
        out["targets"][i, :n - 1] = np.where(trained, s.tokens[1:], -1)
        out["positions"][i, :n - 1] = np.arange(n - 1)
        out["segment_ids"][i, :n - 1] = 1
        out["rollout_logp"][i, :n - 1] = np.where(trained, s.logprobs[1:], 0.0)
    return {k: v.reshape(accumulate, rows, seq_len) for k, v in out.items()}
