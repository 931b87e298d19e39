"""The `rl:` section of an RL stage (docs/post-training.md, "The RL loop"): how rollouts are made, scored and
turned into optimizer steps. The objective's own numbers (clipping, IcePop, temperature) are loss settings
(`losses:`); the prompts, the batch of samples per optimizer step and the response length bound are the
stage's data stage's (a `prompts` source, `tokens_per_step` / `seq_len` samples per step, `seq_len`)."""

from __future__ import annotations

import dataclasses

from glm5_jax.values import boolean, build, fail, is_number, positive_int


@dataclasses.dataclass(frozen=True)
class RLConfig:
    group_size: int = 8  # G: samples per prompt (GLM-5: 32); their rewards' group mean is the baseline
    max_new_tokens: int = 64  # response length bound (the prompt and response must fit the data stage's seq_len)
    updates_per_rollout: int = 1  # optimizer steps per rollout batch: the batch is split into this many steps
    reward: str = "exact_match"  # a built-in reward or the user's `package.module:function`
    reward_workers: int = 2  # processes scoring samples in parallel
    reward_timeout: float = 30.0  # seconds one sample's reward may take (longer: the sample failed)
    normalize_std: bool | None = None  # divide advantages by the group's std (None: grpo yes, dis no)
    teacher: str | None = None  # distill: the teacher's checkpoint directory (same vocabulary)
    eval_prompts: int = 64  # held-out prompts per evaluation (the eval section's schedule)
    eval_samples: int = 4  # answers sampled per held-out prompt (at the rollouts' temperature, a fixed seed)


def from_dict(values: dict, key: str) -> RLConfig:
    """A validated RLConfig from a stage's `rl:` mapping; errors are one line naming `key`.FIELD."""
    cfg = build(RLConfig, values or {}, f"{key}.", "recipe")
    for name in ("group_size", "max_new_tokens", "updates_per_rollout", "reward_workers", "eval_prompts", "eval_samples"):
        positive_int(f"{key}.{name}", getattr(cfg, name))
    if not is_number(cfg.reward_timeout) or cfg.reward_timeout <= 0:
        fail(f"{key}.reward_timeout", f"must be a positive number of seconds; got {cfg.reward_timeout!r}")
    if not isinstance(cfg.reward, str) or not cfg.reward:
        fail(f"{key}.reward", f"must be a built-in reward name or package.module:function; got {cfg.reward!r}")
    if cfg.normalize_std is not None:
        boolean(f"{key}.normalize_std", cfg.normalize_std)
    if cfg.teacher is not None and (not isinstance(cfg.teacher, str) or not cfg.teacher):
        fail(f"{key}.teacher", f"must be a checkpoint directory or null; got {cfg.teacher!r}")
    return cfg
