"""Held-out evaluation of an RL run: the stage's held-out prompts (the recipe's `eval.holdout` of the prompt
source, the first `rl.eval_prompts` of them) answered `rl.eval_samples` times each by the current weights,
sampled as the rollouts are (the policy RL optimises; a fixed seed) and scored by the stage's reward. Logged
to eval.jsonl as `reward` (mean), `solved` (share with reward >= 1), `failed` (samples the reward could not
score), `samples` and `response_len`, on the recipe's `eval` schedule (`eval.at_start` gives the baseline)."""

from __future__ import annotations

import numpy as np

from glm5_jax.errors import ConfigError
from glm5_jax.train.evaluate import eval_due

EVAL_SEED = 0  # every evaluation draws with the same seed: the figures differ by the weights alone


class RLEvaluator:
    def __init__(self, run):
        self.run, self.cfg, self.setup, self.shards = run, run.recipe.eval, run.rl, 1
        for index, prompts in self.setup.prompts.items():
            if not prompts.eval:
                raise ConfigError(f"eval.holdout: {self.cfg.holdout} holds out none of stage "
                                  f"{run.stages[index].name}'s prompts; raise it")

    def due(self, step: int, stage_end: bool) -> bool:
        return eval_due(self.cfg, step, stage_end)

    def run_at(self, stage, program, params, buffers) -> dict:
        """{"reward", "solved", "failed", "samples", "response_len"} of the stage's held-out prompts."""
        rl, prompts = self.setup.rl[stage.index], self.setup.prompts[stage.index]
        n = min(rl.eval_prompts, len(prompts.eval))
        samples = self.setup.engine(stage).generate(
            params, buffers, prompts.eval_ids[:n], rl.eval_samples, version=0, seed=EVAL_SEED, first_sample_id=0,
            prompt_indices=list(range(n)))
        rewards = self.setup.score(stage, samples, prompts.eval[:n])
        ok = ~np.isnan(rewards)
        return {"reward": float(rewards[ok].mean()) if ok.any() else float("nan"),
                "solved": float(np.mean(rewards[ok] >= 1.0)) if ok.any() else float("nan"),
                "failed": int((~ok).sum()), "samples": len(samples),
                "response_len": float(np.mean([len(s.tokens) - s.prompt_length for s in samples]))}
