"""Learning-rate schedules (built from `optax.schedules`) and the batch-size warm-up.

All schedules count optimizer steps and start from 0 with a linear warm-up of `warmup_steps`:
- cosine:   warm-up to `learning_rate`, cosine decay to `end_learning_rate` at `total_steps`;
- linear:   warm-up, then linear decay to `end_learning_rate` at `total_steps`;
- constant: warm-up, then `learning_rate` for ever;
- wsd:      warm-up, stable at `learning_rate`, then the last `decay_steps` decay (linear or cosine) to
            `end_learning_rate`; held there afterwards.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

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


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """Batch-size warm-up as a static gradient-accumulation count per optimizer step.

    The target batch grows linearly with the tokens consumed so far, from `start_tokens` to `end_tokens`
    over the first `warmup_tokens`; step s accumulates `round(target / microbatch_tokens)` microbatches
    (at least 1; halves round up) of a fixed size, so every array shape stays static and the train step compiles once per
    distinct count (e.g. 16M -> 64M tokens with 16M-token microbatches: counts 1, 2, 3, 4, four compiles).
    """

    microbatch_tokens: int
    start_tokens: int
    end_tokens: int
    warmup_tokens: int

    @classmethod
    def from_config(cls, c: OptimizerConfig) -> BatchRamp | None:
        if c.microbatch_tokens is None:
            return None
        return cls(c.microbatch_tokens, c.batch_tokens_start, c.batch_tokens_end, c.batch_warmup_tokens)

    def __post_init__(self):
        # Run-length table of the ramp, one row per distinct count: (first step, count, tokens consumed
        # before that step). Each row's length is solved in closed form, so long ramps cost nothing.
        micro, final = self.microbatch_tokens, self._count(self.end_tokens)
        table, step, consumed = [], 0, 0
        while True:
            n = self._count(self.target_tokens(consumed))
            if not table or table[-1][1] != n:
                table.append((step, n, consumed))
            if n >= final:
                break
            # The count next rounds up once the target reaches (n + 1/2) microbatches.
            threshold = ((n + 0.5) * micro - self.start_tokens) * self.warmup_tokens / (
                self.end_tokens - self.start_tokens)
            k = max(1, math.ceil((threshold - consumed) / (n * micro)))
            step, consumed = step + k, consumed + k * n * micro
        object.__setattr__(self, "table", tuple(table))

    def target_tokens(self, consumed: int) -> float:
        """Wanted tokens per step once `consumed` tokens have been trained on."""
        if consumed >= self.warmup_tokens:
            return float(self.end_tokens)
        return self.start_tokens + (self.end_tokens - self.start_tokens) * consumed / self.warmup_tokens

    def _count(self, tokens: float) -> int:
        return max(1, math.floor(tokens / self.microbatch_tokens + 0.5))

    def _segment(self, step: int):
        return self.table[bisect.bisect_right([s for s, _, _ in self.table], step) - 1]

    def accumulation_steps(self, step: int) -> int:
        """Microbatches to accumulate at optimizer step `step` (0-based)."""
        return self._segment(step)[1]

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps 0 .. step-1."""
        first, n, consumed = self._segment(step)
        return consumed + (step - first) * n * self.microbatch_tokens
