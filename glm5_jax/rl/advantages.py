"""Group-relative advantages of rollouts (host side, NumPy): a prompt's samples form a group, and each
sample's advantage is its reward relative to its group's (docs/post-training.md, "RL objectives").
"""

from __future__ import annotations

import numpy as np

STD_EPSILON = 1e-6  # added to a group's standard deviation before dividing by it


def group_advantages(rewards, groups, valid, normalize_std: bool) -> np.ndarray:
    """[N] float32: A_i = R_i - mean_g R over the valid samples of i's group g (GRPO: divided by std_g R +
    STD_EPSILON when `normalize_std`; std is the population standard deviation of the group's valid rewards).

    rewards [N] float, groups [N] int (any ids), valid [N] bool (false: a failed sample). An invalid sample
    gets 0; so does every sample of a group whose valid rewards are all equal (one valid sample included):
    nothing to learn, and no 0 / 0.
    """
    rewards = np.asarray(rewards, np.float64)
    groups, valid = np.asarray(groups), np.asarray(valid, bool)
    if not rewards.shape == groups.shape == valid.shape or rewards.ndim != 1:
        raise ValueError(f"rewards, groups and valid must be [N] alike; got {rewards.shape}, {groups.shape}, "
                         f"{valid.shape}")
    out = np.zeros(rewards.shape, np.float64)
    for g in np.unique(groups[valid]):
        member = (groups == g) & valid
        r = rewards[member]
        if r.max() == r.min():
            continue
        a = r - r.mean()
        out[member] = a / (r.std() + STD_EPSILON) if normalize_std else a
    return out.astype(np.float32)


def reward_metrics(rewards, groups, valid) -> dict:
    """The rollouts' reward metrics: `reward_mean` (valid samples), `reward_group_std` (the mean over groups
    with a valid sample of their valid rewards' standard deviation: the spread GRPO learns from),
    `uniform_group_share` (groups whose valid rewards are all equal: advantage 0, nothing learned) and
    `failed_share` (invalid samples). Empty groups count in none of the group figures."""
    rewards, groups, valid = np.asarray(rewards, np.float64), np.asarray(groups), np.asarray(valid, bool)
    spread = [rewards[(groups == g) & valid] for g in np.unique(groups[valid])]
    nan = float("nan")
    return {"reward_mean": float(rewards[valid].mean()) if valid.any() else nan,
            "reward_group_std": float(np.mean([r.std() for r in spread])) if spread else nan,
            "uniform_group_share": float(np.mean([r.max() == r.min() for r in spread])) if spread else nan,
            "failed_share": float(1.0 - valid.mean()) if valid.size else nan}
