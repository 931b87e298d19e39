"""Training recipes: typed dataclasses loaded from YAML (`configs/recipes/NAME.yaml`), `key=value` overrides.

A recipe names everything a run needs (model, layout, data, optimizer, losses, run directory, seed, checkpoint
and metrics policy) and an ordered list of stages. Each stage trains on one data stage (its steps come from
that data stage's token budget, or from `steps`), with its own learning-rate schedule, trainable set and loss
settings. `load` validates the whole recipe (and the model, layout, data and optimizer configs it names)
before anything compiles: a bad value is one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from glm5_jax.errors import ConfigError
from glm5_jax.values import (
    apply_overrides,
    boolean,
    build,
    directory,
    is_int,
    is_number,
    positive_int,
    read_yaml_mapping,
    unknown_key,
)

TRAINABLE = ("all", "indexer", "no_indexer")
# Optimizer fields a stage's `schedule` may set; the rest of the optimizer is the recipe's `optimizer`.
SCHEDULE_KEYS = ("schedule", "learning_rate", "warmup_steps", "total_steps", "end_learning_rate", "decay_steps",
                 "wsd_decay")


@dataclasses.dataclass
class CheckpointPolicy:
    interval_steps: int | None = 100  # save every N steps (None: only by time, at stage ends and at the end)
    interval_seconds: float | None = None  # also save when this much wall time passed since the last save
    max_to_keep: int | None = 3  # committed steps kept (None: all)
    async_save: bool = True  # write in a background thread while training goes on
    save_at_stage_end: bool = True  # a checkpoint at the last step of every stage
    save_on_exit: bool = True  # a checkpoint when the run ends (steps done, max_steps, SIGTERM)


@dataclasses.dataclass
class MetricsConfig:
    interval: int = 10  # log every N steps (and the first and last step)
    tensorboard: bool = True  # TensorBoard event files in RUN_DIR/tensorboard (tensorboardX)
    progress: bool = True  # rich progress bar on the console (off when not a terminal)
    peak_flops: float | None = None  # peak FLOP/s of one device for MFU (None: the table by device kind)


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation: the same loss terms on data the run does not train on, no update."""

    data: str | None = None  # data preset / YAML of a held-out source (its first stage's mixture is used);
    # None: a deterministic split of the training sources by document hash (`holdout` of the documents)
    holdout: float = 0.0  # fraction of the training documents held out (with data: null); 0: no eval
    interval_steps: int | None = 100  # evaluate every N steps (None: only at stage ends)
    at_stage_end: bool = True  # and at the last step of every stage
    batches: int = 4  # microbatches of the current stage's shape per evaluation

    @property
    def enabled(self) -> bool:
        return self.data is not None or self.holdout > 0


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process runs (docs/multihost.md); ignored by a single process."""

    init_timeout: float = 300.0  # seconds for every process to join the job before it fails with one line
    peer_timeout: float = 60.0  # seconds without a sign of life from a process before the others stop


@dataclasses.dataclass
class StageRecipe:
    name: str = ""
    data_stage: str | None = None  # data stage it reads (default: the stage's own name)
    steps: int | None = None  # default: the data stage's token budget / tokens per step
    schedule: dict = dataclasses.field(default_factory=dict)  # learning-rate schedule (optimizer schedule keys)
    trainable: str = "all"  # "all", "indexer" (DSA warm-up: everything else frozen) or "no_indexer" (indexer frozen)
    objective: str = "pretrain"  # what the stage optimises: pretrain | sft (glm5_jax.train.objectives)
    qat: str | None = None  # int4: quantization-aware training of the routed experts (the model's `qat`; its
    # group size is the model's qat_group_size); None: the model's own setting
    losses: dict = dataclasses.field(default_factory=dict)  # overrides of the recipe's `losses` for this stage
    model_overrides: dict = dataclasses.field(default_factory=dict)  # model config settings for this stage
    accumulate: int | str | None = None  # microbatches per step: N, or "auto"; None: the recipe's `accumulate`
    layout: str | None = None  # layout preset or YAML file of this stage (None: the recipe's `layout`)
    layout_overrides: dict = dataclasses.field(default_factory=dict)  # on this stage's layout (with no `layout`:
    # after the recipe's layout_overrides)


@dataclasses.dataclass
class Recipe:
    model: str | None = "tiny"  # model preset name, YAML file or HF config.json / directory
    model_overrides: dict = dataclasses.field(default_factory=dict)
    init_from: str | None = None  # checkpoint (Orbax model or training checkpoint, e.g. from hf-to-orbax)
    layout: str | None = None  # layout preset (configs/layouts) or YAML file; None: all devices on data
    layout_overrides: dict = dataclasses.field(default_factory=dict)  # e.g. {mesh: {data: 2, expert: 4}}
    devices: int | None = None  # use the first N devices (None: all)
    data: str = "default"  # data preset or YAML file
    data_overrides: dict = dataclasses.field(default_factory=dict)  # dotted key -> value, e.g. stages.0.seq_len
    optimizer: dict = dataclasses.field(default_factory=dict)  # OptimizerConfig fields (docs/optimizer.md)
    losses: dict = dataclasses.field(default_factory=dict)  # loss settings (glm5_jax.train.losses)
    run_dir: str = "runs/default"
    seed: int = 0  # model initialisation and the saved RNG key (the data order is the data config's `seed`)
    compilation_cache: str | None = None  # persistent XLA compilation cache directory (restarts skip compiles)
    start_stage: str | None = None  # begin at this stage (from init_from, or from the run's checkpoint)
    max_steps: int | None = None  # stop (with a checkpoint) once this global step is reached
    max_nonfinite_in_a_row: int = 5  # consecutive skipped (non-finite) steps before the run stops
    accumulate: int | str = 1  # default microbatches per step of every stage: N, or "auto" (the fewest whose
    # microbatch puts at most max_tokens_per_device tokens on a device)
    max_tokens_per_device: int | None = None  # the budget `accumulate: auto` sizes microbatches by
    data_shards: int | None = None  # blocks each microbatch's rows are read in (docs/multihost.md); None: one
    # per distinct row block the processes hold (1 on one process); a resumed run keeps its checkpoint's
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointPolicy = dataclasses.field(default_factory=CheckpointPolicy)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    stages: list[StageRecipe] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stages(stages) -> list[StageRecipe]:
    if not isinstance(stages, list):
        raise ConfigError("stages: must be a list of stages")
    return [build(StageRecipe, s, f"stages.{i}.", "recipe") for i, s in enumerate(stages)]


_NESTED = {"checkpoint": CheckpointPolicy, "metrics": MetricsConfig, "distributed": DistributedConfig,
           "eval": EvalConfig}


def _build(values) -> Recipe:
    nested = {name: lambda v, cls=cls, name=name: build(cls, v or {}, f"{name}.", "recipe")
              for name, cls in _NESTED.items()}
    return build(Recipe, values, "", "recipe", {**nested, "stages": _stages})


def _accumulate(key: str, v, allow_none: bool):
    if v is None and allow_none or v == "auto":
        return
    if not is_int(v) or v < 1:
        raise ConfigError(f"{key}: must be a positive integer or auto{' or null' if allow_none else ''}; got {v!r}")


def validate(r: Recipe) -> Recipe:
    """Check the recipe's own values (the configs it names are checked by `resolve`)."""
    if r.model is None and r.init_from is None:
        raise ConfigError("model: name a model preset / config, or set init_from to a checkpoint")
    for key in ("model_overrides", "layout_overrides", "data_overrides", "optimizer", "losses"):
        if not isinstance(getattr(r, key), dict):
            raise ConfigError(f"{key}: must be a mapping; got {getattr(r, key)!r}")
    positive_int("devices", r.devices, allow_none=True)
    positive_int("max_steps", r.max_steps, allow_none=True)
    positive_int("max_nonfinite_in_a_row", r.max_nonfinite_in_a_row)
    if not is_int(r.seed):
        raise ConfigError(f"seed: must be an integer; got {r.seed!r}")
    directory("compilation_cache", r.compilation_cache, allow_none=True)
    directory("run_dir", r.run_dir)
    c = r.checkpoint
    positive_int("checkpoint.interval_steps", c.interval_steps, allow_none=True)
    positive_int("checkpoint.max_to_keep", c.max_to_keep, allow_none=True)
    if c.interval_seconds is not None and (not is_number(c.interval_seconds) or c.interval_seconds <= 0):
        raise ConfigError(f"checkpoint.interval_seconds: must be a positive number or null; got {c.interval_seconds!r}")
    for key in ("async_save", "save_at_stage_end", "save_on_exit"):
        boolean(f"checkpoint.{key}", getattr(c, key))
    m = r.metrics
    positive_int("metrics.interval", m.interval)
    for key in ("tensorboard", "progress"):
        boolean(f"metrics.{key}", getattr(m, key))
    if m.peak_flops is not None and (not is_number(m.peak_flops) or m.peak_flops <= 0):
        raise ConfigError(f"metrics.peak_flops: must be a positive number or null; got {m.peak_flops!r}")
    _accumulate("accumulate", r.accumulate, allow_none=False)
    positive_int("data_shards", r.data_shards, allow_none=True)
    for key in ("init_timeout", "peer_timeout"):
        v = getattr(r.distributed, key)
        if not is_number(v) or v <= 0:
            raise ConfigError(f"distributed.{key}: must be a positive number of seconds; got {v!r}")
    positive_int("max_tokens_per_device", r.max_tokens_per_device, allow_none=True)
    e = r.eval
    if e.data is not None and not isinstance(e.data, str):
        raise ConfigError(f"eval.data: must be a data preset / YAML file or null; got {e.data!r}")
    if not is_number(e.holdout) or not 0 <= e.holdout < 1:
        raise ConfigError(f"eval.holdout: must be a fraction in [0, 1); got {e.holdout!r}")
    if e.data is not None and e.holdout:
        raise ConfigError("eval.holdout: set either eval.data (a held-out source) or eval.holdout, not both")
    positive_int("eval.interval_steps", e.interval_steps, allow_none=True)
    positive_int("eval.batches", e.batches)
    boolean("eval.at_stage_end", e.at_stage_end)
    if not r.stages:
        raise ConfigError("stages: a recipe needs at least one stage")
    names = set()
    for i, s in enumerate(r.stages):
        key = f"stages.{i}"
        if not isinstance(s.name, str) or not s.name:
            raise ConfigError(f"{key}.name: every stage needs a name")
        if s.name in names:
            raise ConfigError(f"{key}.name: stage {s.name!r} appears twice")
        names.add(s.name)
        positive_int(f"{key}.steps", s.steps, allow_none=True)
        _accumulate(f"{key}.accumulate", s.accumulate, allow_none=True)
        if (s.accumulate or r.accumulate) == "auto" and r.max_tokens_per_device is None:
            raise ConfigError(f"{key}.accumulate: auto needs max_tokens_per_device (the per-device budget of "
                              "a microbatch, in tokens)")
        if s.trainable not in TRAINABLE:
            raise ConfigError(f"{key}.trainable: must be one of {', '.join(TRAINABLE)}; got {s.trainable!r}")
        if s.layout is not None and (not isinstance(s.layout, str) or not s.layout):
            raise ConfigError(f"{key}.layout: must be a layout preset name or YAML file, or null; got {s.layout!r}")
        for sub in ("schedule", "losses", "model_overrides", "layout_overrides"):
            if not isinstance(getattr(s, sub), dict):
                raise ConfigError(f"{key}.{sub}: must be a mapping; got {getattr(s, sub)!r}")
        for k in s.schedule:
            if k not in SCHEDULE_KEYS:
                raise unknown_key(f"{key}.schedule.{k}", [f"{key}.schedule.{n}" for n in SCHEDULE_KEYS],
                                  "schedule")
    if r.start_stage is not None and r.start_stage not in names:
        raise ConfigError(f"start_stage: no stage named {r.start_stage!r}; stages: {', '.join(s.name for s in r.stages)}")
    return r


def from_dict(values: dict[str, Any]) -> Recipe:
    return validate(_build(values))


def load(source: str, overrides=()) -> Recipe:
    """A recipe from a preset name (`configs/recipes/NAME.yaml`) or YAML file, then `key=value` overrides
    (`checkpoint.interval_steps=10`, `stages.0.steps=50`, `optimizer.learning_rate=1e-3`)."""
    return from_dict(apply_overrides(read_yaml_mapping(source, "recipes", "recipe"), overrides))
