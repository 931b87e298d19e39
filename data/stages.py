"""The context-extension schedule: which stage a global step is in, each stage's microbatches, and the
batch-size warm-up.

A stage's optimizer step takes `global_batch = tokens_per_step / seq_len` rows as `accumulate` microbatches
of `micro_rows` rows (the trainer chooses `accumulate`; rows of a microbatch split evenly over processes).
With a `batch_ramp` the step takes fewer microbatches at first: `count(step)` grows with the tokens consumed
(`BatchRamp`) from the ramp's start to `accumulate`. The stage runs the most steps its token budget covers
(a remainder smaller than one step is dropped). Steps past the last stage stay in the last stage, so a
trainer that runs a little longer keeps getting batches.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

from glm5_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """Batch-size warm-up as a gradient-accumulation count per optimizer step.

    The target batch grows linearly with the tokens consumed so far, from `start_tokens` to `end_tokens`
    over the first `warmup_tokens`; step s accumulates `round(target / microbatch_tokens)` microbatches (at
    least 1; halves round up) of a fixed size. The train step takes the count as a traced argument, so the
    whole ramp is one compiled program.
    """

    microbatch_tokens: int
    start_tokens: int
    end_tokens: int
    warmup_tokens: int

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

    def steps_within(self, tokens: int) -> int:
        """The most steps whose tokens together stay within `tokens`."""
        lo, hi = 0, tokens // self.microbatch_tokens + 1  # steps(lo) fit, steps(hi) do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.tokens_before(mid) <= tokens else (lo, mid)
        return lo


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    name: str
    seq_len: int
    tokens_per_step: int  # after the batch ramp (if any)
    global_batch: int  # rows per step after the ramp: accumulate x micro_rows
    accumulate: int  # microbatches per step after the ramp
    micro_rows: int  # rows of one microbatch, all processes
    local_micro_rows: int  # rows of one microbatch, this process
    start_step: int  # first global step of the stage
    end_step: int  # one past its last step
    mixture: dict
    rope: dict | None  # rope_parameters to set on the model for this stage (None: unchanged)
    ramp: BatchRamp | None = None

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step

    @property
    def local_batch(self) -> int:
        """Rows per step of this process after the ramp."""
        return self.accumulate * self.local_micro_rows

    def count(self, step: int) -> int:
        """Microbatches global step `step` of this stage takes."""
        return self.accumulate if self.ramp is None else self.ramp.accumulation_steps(step - self.start_step)

    def tokens_before(self, step: int) -> int:
        """Tokens the stage's steps before global step `step` take."""
        k = step - self.start_step
        return k * self.tokens_per_step if self.ramp is None else self.ramp.tokens_before(k)

    def model_overrides(self) -> dict:
        """Model config fields this stage changes (``dataclasses.replace(model_cfg, **overrides)``)."""
        return model_overrides(self.rope)


def model_overrides(rope: dict | None) -> dict:
    """Model config fields a data stage with RoPE settings `rope` (or None) changes."""
    return {} if rope is None else {"rope_parameters": dict(rope)}


class Schedule:
    """The stages of a data config; `accumulate` maps stage names to microbatches per step (default 1)."""

    def __init__(self, stages, process_count: int = 1, accumulate: dict | None = None):
        self.stages: list[Stage] = []
        start = 0
        for i, s in enumerate(stages):
            n = (accumulate or {}).get(s.name, 1)
            if s.global_batch % n:
                raise ConfigError(f"stages.{i}.accumulate: {s.global_batch} rows per step do not split into "
                                  f"{n} microbatches")
            micro = s.global_batch // n
            if micro % process_count:
                raise ConfigError(f"stages[{i}].tokens_per_step: a microbatch of {micro} rows (tokens_per_step / "
                                  f"seq_len / accumulate) must divide evenly over {process_count} processes")
            ramp, steps = None, s.steps
            if s.batch_ramp is not None:
                ramp = BatchRamp(micro * s.seq_len, s.batch_ramp["start_tokens_per_step"], s.tokens_per_step,
                                 s.batch_ramp["tokens"])
                steps = ramp.steps_within(s.tokens)
            self.stages.append(Stage(i, s.name, s.seq_len, s.tokens_per_step, s.global_batch, n, micro,
                                     micro // process_count, start, start + steps, dict(s.mixture),
                                     None if s.rope is None else dict(s.rope), ramp))
            start += steps

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    def at(self, step: int) -> Stage:
        """The stage global step ``step`` belongs to."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        for s in self.stages:
            if step < s.end_step:
                return s
        return self.stages[-1]

    def by_name(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"--stage: no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    def table(self) -> list[dict]:
        """One row per stage, for display and docs."""
        return [{"stage": s.name, "seq_len": s.seq_len, "tokens/step": s.tokens_per_step,
                 "global batch": s.global_batch, "local batch": s.local_batch, "steps": s.steps,
                 "first step": s.start_step, "tokens": s.tokens_before(s.end_step),
                 "ramp": "none" if s.ramp is None else
                 f"{s.ramp.start_tokens:,} -> {s.tokens_per_step:,} over {s.ramp.warmup_tokens:.3g} tokens",
                 "rope": "unchanged" if s.rope is None else ", ".join(f"{k}={v}" for k, v in s.rope.items()),
                 "mixture": ", ".join(f"{k}:{v:g}" for k, v in s.mixture.items())} for s in self.stages]
