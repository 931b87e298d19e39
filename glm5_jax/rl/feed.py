"""The batches of an RL stage: rollouts of the current weights, scored, turned into the objective's fields.

`glm5 train` reads an RL stage's batches from an `RLFeed` as it reads text stages' from `train.feed.Feed`. A
rollout happens every `rl.updates_per_rollout` optimizer steps (the *weight version* is the step it starts
at): the stage's next prompts (data/prompts.py) are answered G times each by the rollout engine from the
weights of that step (generating), the answers scored by the reward in worker processes (scoring), their
group advantages computed (and the teacher's or the KL reference's log-probs, where the objective reads them),
and the samples split into the steps' batches (training). The trainer's old_logp is the rollout's own
scoring pass (RLSetup.extra_logprobs says why), so rho = 1 here. Everything a rollout depends on is a
function of the step (its prompts, its random seed) or of the weights, so a resumed run makes the same
rollouts; the batches of a rollout not yet trained are kept in the checkpoint's data state (`state()`), so a
stop between them resumes exactly.
"""

from __future__ import annotations

import base64
import time

import jax
import numpy as np

from glm5_jax.errors import ConfigError
from glm5_jax.rl import advantages as adv_lib
from glm5_jax.rl.scoring import to_batch
from glm5_jax.rl.objectives import rho_quantiles
from glm5_jax.rl.setup import item_budget
from glm5_jax.train.step import BATCH_AXES


def encode_array(a: np.ndarray) -> dict:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["data"]), np.dtype(d["dtype"])).reshape(d["shape"]).copy()


class RLFeed:
    """An RL run's data feed (the `train.feed.Feed` protocol): `next_batch(stage, state)` rolls out when the
    last rollout's batches are used up; `ahead` is False (a batch needs the previous step's weights)."""

    ahead = False
    reset_optimizer = False

    def __init__(self, run, setup, states: dict | None = None):
        if jax.process_count() > 1:
            raise ConfigError("objective: RL stages run in one process (the rollout engine is not multi-process)")
        self.run, self.setup, self.shards, self.indices = run, setup, 1, [0]
        self.pending: list[dict] = []  # the batches of the current rollout not yet handed out
        self.report_next: dict = {}
        saved = (states or {}).get("rl")
        if saved:
            self.pending = [{k: decode_array(v) for k, v in b.items()} for b in saved["pending"]]

    def next_batch(self, stage, state):
        """(global batch {field: [accumulate, rows, L]}, microbatches it takes) of the next step."""
        if not self.pending:
            self.pending = self._rollout(stage, state)
        batch = self.pending.pop(0)
        spec = stage.step
        sharding = self.run.par.sharding(BATCH_AXES, spec.batch_shape)
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}, spec.accumulate

    def report(self) -> dict:
        """Host-side metrics of the rollout the last batch came from (once, on its first step)."""
        out, self.report_next = self.report_next, {}
        return out

    def _rollout(self, stage, state) -> list[dict]:
        rl, prompts = self.setup.rl[stage.index], self.setup.prompts[stage.index]
        spec, d = stage.step, stage.data
        per_step = d.global_batch  # samples per optimizer step
        n_prompts = per_step * rl.updates_per_rollout // rl.group_size
        k = (state.step - d.start_step) // rl.updates_per_rollout
        chosen = prompts.batch(k, n_prompts)
        t0 = time.perf_counter()
        samples = self.setup.engine(stage).generate(
            state.params, state.buffers, [prompts.train_ids[i] for i in chosen], rl.group_size, version=state.step,
            seed=hash_seed(self.run.recipe.seed, state.step), first_sample_id=state.step * per_step,
            prompt_indices=chosen, budgets=[item_budget(rl.max_new_tokens, prompts.train[i]) for i in chosen])
        t1 = time.perf_counter()
        rewards = self.setup.score(stage, samples, [prompts.train[i] for i in chosen])
        t2 = time.perf_counter()
        valid = ~np.isnan(rewards)
        groups = np.array([s.group for s in samples])
        advantages = adv_lib.group_advantages(np.nan_to_num(rewards), groups, valid, self.setup.normalize_std(stage))
        batch = {k: v[0] for k, v in to_batch(samples, spec.seq_len, len(samples), 1).items()}  # [samples, L]
        scored = batch["targets"] >= 0
        batch["advantages"] = np.where(scored, advantages[:, None], 0.0).astype(np.float32)
        batch["old_logp"] = batch["rollout_logp"]  # (the trainer's program, same layout: RLSetup.extra_logprobs)
        batch.update(self.setup.extra_logprobs(stage, batch))  # teacher_logp / ref_logp
        t3 = time.perf_counter()
        lengths = np.array([len(s.tokens) - s.prompt_length for s in samples])
        self.report_next = {
            **adv_lib.reward_metrics(rewards, groups, valid), "failed": int((~valid).sum()),
            **rho_quantiles(batch["old_logp"], batch["rollout_logp"], batch["targets"], (0.01, 0.5, 0.99, 1.0)),
            "response_len_mean": float(lengths.mean()), "response_len_max": int(lengths.max()),
            "truncated_share": float(np.mean([not s.finished for s in samples])),
            "generate_s": t1 - t0, "reward_s": t2 - t1, "logprob_s": t3 - t2}
        fields = list(spec.fields)
        shape = (rl.updates_per_rollout, spec.accumulate, spec.rows, spec.seq_len)
        return [{f: batch[f].reshape(shape)[u] for f in fields} for u in range(rl.updates_per_rollout)]

    def state(self) -> dict:
        """The data state document: the batches of the current rollout still to train."""
        return {"shards": 1, "states": {"rl": {"pending": [{k: encode_array(v) for k, v in b.items()}
                                                           for b in self.pending]}}}

    def close(self):
        self.setup.close()


def hash_seed(seed: int, step: int) -> int:
    """The rollout's sampling seed: a function of the run's seed and the step (so a resumed run redraws it)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
