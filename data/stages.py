"""The context-extension schedule: which stage a global step is in, and each stage's batch shape.

Stage ``i`` runs ``tokens // tokens_per_step`` steps (a remainder smaller than one step is dropped) with
``global_batch = tokens_per_step / seq_len`` rows split evenly over processes. Steps past the last stage's
budget stay in the last stage, so a trainer that runs a little longer keeps getting batches.
"""

from __future__ import annotations

import dataclasses

from glm5_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    name: str
    seq_len: int
    tokens_per_step: int
    global_batch: int
    local_batch: int  # rows per process
    start_step: int  # first global step of the stage
    end_step: int  # one past its last step
    mixture: dict
    rope: dict | None  # rope_parameters to set on the model for this stage (None: unchanged)

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step

    def model_overrides(self) -> dict:
        """Model config fields this stage changes (``dataclasses.replace(model_cfg, **overrides)``)."""
        return {} if self.rope is None else {"rope_parameters": dict(self.rope)}


class Schedule:
    def __init__(self, stages, process_count: int = 1):
        self.stages: list[Stage] = []
        start = 0
        for i, s in enumerate(stages):
            if s.global_batch % process_count:
                raise ConfigError(f"stages[{i}].tokens_per_step: the global batch of {s.global_batch} rows "
                                  f"(tokens_per_step / seq_len) must divide evenly over {process_count} "
                                  "processes")
            self.stages.append(Stage(i, s.name, s.seq_len, s.tokens_per_step, s.global_batch,
                                     s.global_batch // process_count, start, start + s.steps,
                                     dict(s.mixture), None if s.rope is None else dict(s.rope)))
            start += s.steps

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
                 "first step": s.start_step, "tokens": s.steps * s.tokens_per_step,
                 "rope": "unchanged" if s.rope is None else ", ".join(f"{k}={v}" for k, v in s.rope.items()),
                 "mixture": ", ".join(f"{k}:{v:g}" for k, v in s.mixture.items())} for s in self.stages]
