"""What an RL run needs besides the train step, built and checked once from the resolved run: each RL stage's
`rl:` settings, its prompts, reward, rollout engine and log-prob scorers (the trainer's, the teacher's, the
KL reference's). `glm5 train` builds it (`with_rl`) right after resolving the recipe, so every bad input is one line
before compilation; `glm5 plan` compiles an RL stage's step without it (no prompt is read).
"""

from __future__ import annotations

import os

import numpy as np

from glm5_jax.errors import CheckpointError, ConfigError
from glm5_jax.train.setup import is_hf_directory


def with_rl(run):
    """`run` with its `RLSetup` when its stages train on rollouts (checked here), else `run`."""
    import dataclasses

    return dataclasses.replace(run, rl=RLSetup(run)) if any(is_rl(s) for s in run.stages) else run


def is_rl(stage) -> bool:
    """Whether a resolved stage trains on rollouts (its objective reads a `prompts` source)."""
    from glm5_jax.train import objectives

    return objectives.OBJECTIVES[stage.step.objective].data_format == "prompts"


class RLSetup:
    """The RL stages of a resolved run (`train.setup.Run`), with their prompts and rewards checked."""

    def __init__(self, run):
        from glm5_jax.data.errors import ErrorPolicy
        from glm5_jax.data.prompts import PromptSet
        from glm5_jax.data.tokenizer import build_tokenizer
        from glm5_jax.generate.runner import eos_ids
        from glm5_jax.rl import config as rl_config
        from glm5_jax.rl import objectives as rl_objectives
        from glm5_jax.rl.rewards import load_reward

        self.run = run
        stages = [s for s in run.stages if is_rl(s)]
        if len(stages) != len(run.stages):
            other = next(s for s in run.stages if not is_rl(s))
            raise ConfigError(f"stages.{other.index}.objective: {other.step.objective} trains on data, and this "
                              "recipe's other stages on rollouts; run RL as a recipe of its own (init_from the "
                              "checkpoint it starts from)")
        self.tokenizer = build_tokenizer(run.data_cfg.tokenizer)
        self.eos = eos_ids(run.model_cfg)
        policy = ErrorPolicy(run.data_cfg.on_error)
        self.rl, self.prompts = {}, {}
        for s in stages:
            key = f"stages.{s.index}"
            rl = self.rl[s.index] = rl_config.from_dict(run.recipe.stages[s.index].rl, f"{key}.rl")
            rl_objectives.check_group_size(s.step.objective, rl.group_size, f"{key}.rl.group_size")
            if (s.data.global_batch * rl.updates_per_rollout) % rl.group_size:
                raise ConfigError(f"{key}.rl.group_size: {s.data.global_batch} samples per step x "
                                  f"{rl.updates_per_rollout} updates per rollout are not whole groups of "
                                  f"{rl.group_size}")
            load_reward(rl.reward, f"{key}.rl.reward")
            prompts = self.prompts[s.index] = PromptSet(run.data_cfg, s.name, self.tokenizer, policy,
                                                        run.recipe.eval.holdout)
            room = s.data.seq_len - rl.max_new_tokens
            if room < 1:
                raise ConfigError(f"{key}.rl.max_new_tokens: {rl.max_new_tokens} leaves no room for a prompt in the "
                                  f"data stage's seq_len {s.data.seq_len}")
            ids = prompts.train_ids + prompts.eval_ids
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            if len(ids[longest]) > room:
                text = str((prompts.train + prompts.eval)[longest][prompts.field])[:40]
                raise ConfigError(f"{key}.rl.max_new_tokens: a prompt of {len(ids[longest])} tokens ({text!r}...) "
                                  f"and {rl.max_new_tokens} new tokens exceed the data stage's seq_len "
                                  f"{s.data.seq_len}")
            if s.step.objective == "distill":
                self._teacher_config(rl.teacher, f"{key}.rl.teacher")
            elif rl.teacher is not None:
                raise ConfigError(f"{key}.rl.teacher: only objective distill reads a teacher")
            if s.step.loss_cfg.kl_weight > 0 and not run.recipe.init_from:
                raise ConfigError(f"{key}.losses.kl_weight: the KL term's reference policy is the init_from "
                                  "checkpoint; set init_from")
            if s.step.trainable != "no_indexer":
                raise ConfigError(f"{key}.trainable: RL keeps the DSA indexer frozen; use no_indexer")
            for i, record in enumerate(prompts.train + prompts.eval):
                b = record.get("max_new_tokens", 1)
                if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                    raise ConfigError(f"{key}: prompt {i} (source record) max_new_tokens must be a positive integer; "
                                      f"got {b!r}")
            if rl.asynchronous is not None:
                self._check_async(s, rl, key)
        if len({self.rl[s.index].asynchronous is None for s in stages}) > 1:
            raise ConfigError("stages: every RL stage of a run sets rl.asynchronous, or none does")
        self.asynchronous = self.rl[stages[0].index].asynchronous is not None  # (Ray rollout workers)
        self._cache: dict = {}
        init = run.recipe.init_from
        # The KL term's reference: the weights the run started from (a transformers directory as converted).
        self.reference = None if not init else os.path.join(run.recipe.run_dir, "init-from-hf") \
            if is_hf_directory(init) else init

    @staticmethod
    def _check_async(stage, rl, key):
        if rl.updates_per_rollout != 1:
            raise ConfigError(f"{key}.rl.updates_per_rollout: an asynchronous stage trains each sample once (the "
                              f"buffer gives every step new samples); drop it, or set 1")
        if stage.step.objective == "distill":
            raise ConfigError(f"{key}.objective: distill rolls out synchronously (drop rl.asynchronous)")

    def _teacher_config(self, path, key):
        from glm5_jax.checkpoint.store import CheckpointReader

        if path is None:
            raise ConfigError(f"{key}: objective distill needs the teacher's checkpoint directory")
        try:
            cfg = CheckpointReader(path).config
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from None
        if cfg.vocab_size != self.run.model_cfg.vocab_size:
            raise ConfigError(f"{key}: the teacher's vocabulary ({cfg.vocab_size} ids) is not the model's "
                              f"({self.run.model_cfg.vocab_size})")
        return cfg

    def rewards(self, stage):
        """The stage's reward worker pool (started on first use; `close` stops it)."""
        from glm5_jax.rl.rewards import RewardPool

        rl = self.rl[stage.index]
        return self._cached(("rewards", stage.index), lambda: RewardPool(rl.reward, rl.reward_workers,
                                                                        rl.reward_timeout))

    def score(self, stage, samples, items) -> np.ndarray:
        """Reward every sample (its answer, the tokens after the prompt less a final EOS, decoded, against its
        prompt's record `items[sample.group]`) with the stage's reward; fills `reward` / `failure` and returns
        the rewards [N] float64, NaN where the reward failed."""
        texts = [self.tokenizer.decode(answer_ids(s, self.eos)) for s in samples]
        scores = self.rewards(stage).score([(t, items[s.group]) for t, s in zip(texts, samples)])
        for s, sc in zip(samples, scores):
            s.reward, s.failure = sc.reward, (None if sc.reward is not None else sc.reason)
        return np.array([np.nan if s.reward is None else s.reward for s in samples], np.float64)

    def close(self):
        for key, value in list(self._cache.items()):
            if key[0] == "rewards":
                value.close()
                del self._cache[key]

    def normalize_std(self, stage) -> bool:
        rl = self.rl[stage.index]
        return rl.normalize_std if rl.normalize_std is not None else stage.step.objective == "grpo"

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def engine(self, stage):
        """The stage's rollout engine: sampling at the objective's temperature, samples of the data stage's
        seq_len, scored in one batch of the rollout's samples (the trainer's old_logp is that same program)."""
        from glm5_jax.rl.rollout import RolloutEngine

        rl = self.rl[stage.index]
        return self._cached(("engine", stage.index), lambda: RolloutEngine(
            stage.step.model_cfg, self.run.par, temperature=stage.step.loss_cfg.temperature,
            max_new_tokens=rl.max_new_tokens, max_length=stage.data.seq_len))

    def scorer(self, stage, cfg):
        """A log-prob scorer of another model (the teacher's) in the run's layout, at the stage's temperature."""
        from glm5_jax.rl.scoring import Scorer

        return self._cached(("scorer", stage.index, repr(cfg)),
                            lambda: Scorer(cfg, self.run.par, stage.step.loss_cfg.temperature))

    def _policy(self, directory: str, cfg):
        """(params, buffers) {dotted name: array} of a checkpoint's newest step (teacher, KL reference), loaded once."""
        def load():
            import jax

            from glm5_jax.checkpoint.manager import load_variables
            from glm5_jax.checkpoint.naming import flatten
            from glm5_jax.model.state import abstract_state, state_shardings

            state = abstract_state(cfg, 0)
            names = {"params": flatten(state.params), "buffers": flatten(state.buffers)}
            shardings = {**flatten(state_shardings(state.params, self.run.par)),
                         **flatten(state_shardings(state.buffers, self.run.par))}
            abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                        for part in names.values() for k, v in part.items()}
            variables = load_variables(directory, abstract)
            return tuple({k: variables[k] for k in names[part]} for part in ("params", "buffers"))
        return self._cached(("policy", directory), load)

    def extra_logprobs(self, stage, batch: dict) -> dict:
        """The log-prob fields besides the rollout's for a rollout's samples `batch` ([samples, L]):
        `teacher_logp` (distill) and `ref_logp` (KL term). The trainer's `old_logp` is the rollout's own
        `rollout_logp`: the engine runs in the trainer's layout and dtype and scores with the trainer's program
        over the same batch, so recomputing it would give the same bits (docs/post-training.md, "Log-prob
        parity")."""
        from glm5_jax.checkpoint.store import CheckpointReader

        rl, out = self.rl[stage.index], {}
        if stage.step.objective == "distill":
            tcfg = CheckpointReader(rl.teacher).config
            out["teacher_logp"] = self.scorer(stage, tcfg)(*self._policy(rl.teacher, tcfg), batch)
        if stage.step.loss_cfg.kl_weight > 0:
            out["ref_logp"] = self.engine(stage).scorer(*self._policy(self.reference, stage.step.model_cfg), batch)
        return out


def answer_ids(sample, eos: tuple) -> np.ndarray:
    """A sample's answer: the token ids the model wrote after the prompt, less a final EOS."""
    r = sample.tokens[sample.prompt_length:]
    return r[:-1] if len(r) and int(r[-1]) in eos else r


def item_budget(bound: int, item: dict) -> int:
    """A prompt's response length bound: the stage's `rl.max_new_tokens`, or the prompt record's own
    `max_new_tokens` where it is smaller (a task whose answers are short)."""
    return min(bound, int(item.get("max_new_tokens", bound)))
