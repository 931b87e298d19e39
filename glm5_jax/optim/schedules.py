"""Learning-rate schedules (built from `optax.schedules`).

All schedules count optimizer steps and start from 0 with a linear warm-up of `warmup_steps`:
- cosine:   warm-up to `learning_rate`, cosine decay to `end_learning_rate` at `total_steps`;
- linear:   warm-up, then linear decay to `end_learning_rate` at `total_steps`;
- constant: warm-up, then `learning_rate` for ever;
- wsd:      warm-up, stable at `learning_rate`, then the last `decay_steps` decay (linear or cosine) to
            `end_learning_rate`; held there afterwards.
"""

from __future__ import annotations

import optax

from glm5_jax.optim.config import OptimizerConfig


def learning_rate_schedule(c: OptimizerConfig) -> optax.Schedule:
    lr, end, warm, total = c.learning_rate, c.end_learning_rate, c.warmup_steps, c.total_steps
    if c.schedule == "cosine":
        return optax.schedules.warmup_cosine_decay_schedule(0.0, lr, warm, total, end)
    warmup = optax.schedules.linear_schedule(0.0, lr, warm)
    if c.schedule == "constant":  # (optax's warmup_constant_schedule stays at 0 when warmup_steps is 0)
        return optax.schedules.join_schedules([warmup, optax.schedules.constant_schedule(lr)], [warm])
    if c.schedule == "linear":
        return optax.schedules.join_schedules([warmup, optax.schedules.linear_schedule(lr, end, total - warm)],
                                              [warm])
    # wsd
    if c.wsd_decay == "linear":
        decay = optax.schedules.linear_schedule(lr, end, c.decay_steps)
    else:
        decay = optax.schedules.cosine_decay_schedule(lr, c.decay_steps, alpha=end / lr if lr else 0.0)
    return optax.schedules.join_schedules([warmup, optax.schedules.constant_schedule(lr), decay],
                                          [warm, total - c.decay_steps])
