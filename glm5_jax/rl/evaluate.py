"""Held-out evaluation of an RL run: the stage's held-out prompts (the recipe's `eval.holdout` of the prompt
source, the first `rl.eval_prompts` of them) answered greedily by the current weights and scored by the
stage's reward. Logged to eval.jsonl as `reward` (mean), `solved` (share with reward >= 1), `failed`
(samples the reward could not score) and `response_len`, on the recipe's `eval` schedule (`eval.at_start`
gives the baseline)."""

from __future__ import annotations

import numpy as np

from glm5_jax.errors import ConfigError


class RLEvaluator:
    def __init__(self, run):
        self.run, self.cfg, self.setup, self.shards = run, run.recipe.eval, run.rl, 1
        for index, prompts in self.setup.prompts.items():
            if not prompts.eval:
                raise ConfigError(f"eval.holdout: {self.cfg.holdout} holds out none of stage "
                                  f"{run.stages[index].name}'s prompts; raise it")

    def due(self, step: int, stage_end: bool) -> bool:
        c = self.cfg
        return (c.interval_steps is not None and step % c.interval_steps == 0) or (c.at_stage_end and stage_end)

    def run_at(self, stage, program, params, buffers) -> dict:
        """{"reward", "solved", "failed", "response_len", "prompts"} of the stage's held-out prompts (greedy)."""
        rl, prompts = self.setup.rl[stage.index], self.setup.prompts[stage.index]
        records = prompts.eval[:rl.eval_prompts]
        answers = self.setup.engine(stage).greedy(params, buffers, [prompts.ids(r) for r in records])
        eos = self.setup.eos
        texts = [self.setup.tokenizer.decode(a[:-1] if len(a) and int(a[-1]) in eos else a) for a in answers]
        scores = self.setup.rewards(stage).score(list(zip(texts, records)))
        rewards = np.array([np.nan if s.reward is None else s.reward for s in scores])
        ok = ~np.isnan(rewards)
        return {"reward": float(rewards[ok].mean()) if ok.any() else float("nan"),
                "solved": float(np.mean(rewards[ok] >= 1.0)) if ok.any() else float("nan"),
                "failed": int((~ok).sum()), "prompts": len(records),
                "response_len": float(np.mean([len(a) for a in answers]))}
