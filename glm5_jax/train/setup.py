"""A recipe resolved into what each stage runs, validated against the layout once, before anything is traced.

`resolve(recipe, devices)` loads the model, layout and data configs the recipe names (applying its
overrides as data), builds each stage's layout (`stages.N.layout`, default the recipe's), chooses every
stage's gradient accumulation in that layout, builds the data schedule with it, and checks each stage's
model and batch against its layout (`glm5_jax.model.layout_check.check_layout`). Every problem is one
`ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import optax

from glm5_jax import config as config_lib
from glm5_jax import optim
from glm5_jax.checkpoint.store import CheckpointReader
from glm5_jax.data import config as data_config
from glm5_jax.data.stages import Schedule, model_overrides
from glm5_jax.errors import ConfigError, ConversionError
from glm5_jax.model.layout_check import check_layout
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.layout import layout_from_dict, load_layout
from glm5_jax.train import losses, objectives
from glm5_jax.train.recipe import SCHEDULE_KEYS, Recipe
from glm5_jax.train.step import StepConfig
from glm5_jax.values import apply_overrides


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """What one recipe stage runs: its data stage, its train step's settings, its learning-rate schedule."""

    index: int
    name: str
    par: Parallelism  # the stage's layout (`stages.N.layout`, default the recipe's)
    data: object  # glm5_jax.data.stages.Stage: steps, rows, microbatches, ramp
    step: StepConfig  # model config (the stage's RoPE), loss config, microbatch shape, trainable set
    opt_cfg: optim.OptimizerConfig  # the stage's schedule settings
    schedule: optax.Schedule  # learning rate at the stage-relative step
    bias_rate: float  # router-bias update rate of the stage

    def describe(self) -> str:
        d = self.data
        ramp = f" (ramp from {d.ramp.accumulation_steps(0)})" if d.ramp is not None else ""
        return (f"stage {self.name}: steps {d.start_step}..{d.end_step - 1}, {d.global_batch} x {d.seq_len} "
                f"tokens per step as {d.accumulate}{ramp} microbatches of {d.micro_rows} rows, trainable "
                f"{self.step.trainable}, lr {self.opt_cfg.schedule} {self.opt_cfg.learning_rate:g}")


@dataclasses.dataclass(frozen=True)
class Run:
    recipe: Recipe
    model_cfg: config_lib.ModelConfig  # the model before any stage's changes (the initialisation's)
    data_cfg: object
    par: Parallelism  # the first stage's layout (the trainer runs every stage in it)
    opt_base: optim.OptimizerConfig  # the optimizer at learning rate 1 (each step scales its update)
    stages: list[StageSettings]

    def stage_at(self, step: int) -> StageSettings:
        for s in self.stages:
            if step < s.data.end_step:
                return s
        return self.stages[-1]

    @property
    def total_steps(self) -> int:
        return self.stages[-1].data.end_step

    @property
    def start_step(self) -> int:
        """The first step of the recipe's `start_stage` (0 without one)."""
        return next((s.data.start_step for s in self.stages if s.name == self.recipe.start_stage), 0)


def unit_rate_optimizer(values: dict) -> optim.OptimizerConfig:
    """The optimizer as the train step runs it: learning rate 1 and no schedule (the step scales each update by
    its stage's learning rate, an argument), from an `optimizer:` section whose schedule keys are dropped."""
    base = {k: v for k, v in values.items() if k not in SCHEDULE_KEYS}
    return _keyed("optimizer", optim.from_dict, {**base, "learning_rate": 1.0, "schedule": "constant",
                                                 "warmup_steps": 0})


def check_vocab(key: str, tokenizer_vocab: int, cfg):
    """The tokenizer's ids must fit the model's vocabulary."""
    if tokenizer_vocab > cfg.vocab_size:
        raise ConfigError(f"{key}: the tokenizer emits {tokenizer_vocab} ids but the model's vocab_size is "
                          f"{cfg.vocab_size}")


def _keyed(key: str, fn, *args):
    try:
        return fn(*args)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def is_hf_directory(path: str) -> bool:
    """Whether `init_from` names a transformers directory (config.json beside safetensors) rather than a
    checkpoint of ours."""
    return os.path.isfile(os.path.join(path, "config.json"))


def base_model(recipe: Recipe) -> config_lib.ModelConfig:
    if recipe.init_from and is_hf_directory(recipe.init_from):
        from glm5_jax.convert.hf import HFDirectory

        try:
            cfg = HFDirectory(recipe.init_from).config
        except ConversionError as e:
            raise ConfigError(f"init_from: {e}") from None
        return config_lib.from_dict(apply_overrides(cfg.to_dict(), recipe.model_overrides))
    if recipe.init_from:
        cfg = CheckpointReader(recipe.init_from).config
        return config_lib.from_dict(apply_overrides(cfg.to_dict(), recipe.model_overrides))
    return config_lib.load(recipe.model, recipe.model_overrides)


def stage_layout(recipe: Recipe, index: int):
    """The layout (`ParallelConfig`) stage `index` runs in: its own `layout` with its `layout_overrides`, or
    the recipe's `layout` with the recipe's `layout_overrides` and then the stage's."""
    st = recipe.stages[index]
    if st.layout:
        return _keyed(f"stages.{index}.layout", load_layout, st.layout, st.layout_overrides)
    layout = _keyed("layout", load_layout, recipe.layout, recipe.layout_overrides)
    if not st.layout_overrides:
        return layout
    values = apply_overrides(dataclasses.asdict(layout), st.layout_overrides)
    return _keyed(f"stages.{index}.layout_overrides", layout_from_dict, values)


def layout_devices(recipe: Recipe, devices=None) -> list:
    devices = jax.devices() if devices is None else devices
    if recipe.devices is not None:
        if recipe.devices > len(devices):
            raise ConfigError(f"devices: {recipe.devices} requested but only {len(devices)} are available")
        devices = devices[:recipe.devices]
    return list(devices)


def layout_of(recipe: Recipe, devices=None, index: int = 0) -> Parallelism:
    """Stage `index`'s layout on the recipe's devices."""
    st = recipe.stages[index] if recipe.stages else None
    key = ("layout" if st is None or not (st.layout or st.layout_overrides) else
           f"stages.{index}.layout" if st.layout else f"stages.{index}.layout_overrides")
    layout = stage_layout(recipe, index) if st is not None else _keyed("layout", load_layout, recipe.layout,
                                                                       recipe.layout_overrides)
    try:
        return Parallelism.create(layout, layout_devices(recipe, devices))
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"{key}: {e}") from None


def choose_accumulation(key: str, want, rows: int, seq_len: int, par: Parallelism, budget: int | None, cfg) -> int:
    """Microbatches per step: `want` checked, or for "auto" the fewest whose microbatch the layout runs
    (`check_layout`) and that puts at most `budget` tokens on a device."""
    if want != "auto":
        check_layout(cfg, par, rows, seq_len, key, want)
        return want
    # What no accumulation fixes (the sequence, the experts, the pipeline), checked on rows that always split.
    check_layout(cfg, par, par.axis_size("batch") * par.config.microbatches, seq_len, key)
    per_device = par.axis_size("batch") * par.axis_size("length")
    for n in range(1, rows + 1):
        if _runs(cfg, par, rows, seq_len, n) and (rows // n) * seq_len // per_device <= budget:
            return n
    raise ConfigError(f"{key}.accumulate: auto: no split of {rows} rows of {seq_len} into microbatches the "
                      f"layout runs puts at most max_tokens_per_device={budget} tokens on a device")


def _runs(cfg, par: Parallelism, rows: int, seq_len: int, accumulate: int) -> bool:
    try:
        check_layout(cfg, par, rows, seq_len, accumulate=accumulate)
    except ConfigError:
        return False
    return True


def resolve(recipe: Recipe, devices=None) -> Run:
    model_cfg = base_model(recipe)
    pars, by_layout = [], {}
    for i in range(len(recipe.stages)):  # stages with equal layouts share one Parallelism (one mesh)
        layout = repr(stage_layout(recipe, i))
        if layout not in by_layout:
            by_layout[layout] = layout_of(recipe, devices, i)
        pars.append(by_layout[layout])
    dcfg = data_config.load(recipe.data, recipe.data_overrides)
    by_name = {s.name: s for s in dcfg.stages}
    stages, cfgs, accumulate = [], [], {}
    for i, st in enumerate(recipe.stages):
        name = st.data_stage or st.name
        if name not in by_name:
            raise ConfigError(f"stages.{i}.data_stage: data config {recipe.data!r} has no stage {name!r}; "
                              f"its stages: {', '.join(by_name)}")
        ds = by_name[name]
        tokens = ds.tokens if st.steps is None else st.steps * ds.tokens_per_step
        if st.steps is not None and ds.batch_ramp is not None:
            raise ConfigError(f"stages.{i}.steps: data stage {name!r} has a batch_ramp; its token budget sets "
                              "the steps")
        stages.append(dataclasses.replace(ds, name=st.name, tokens=tokens))
        over = {**model_overrides(ds.rope), **st.model_overrides, **({"qat": st.qat} if st.qat else {})}
        try:
            cfgs.append(config_lib.from_dict({**model_cfg.to_dict(), **over}))
        except ConfigError as e:  # (the stage's qat option, or its model_overrides)
            qat = st.qat and str(e).startswith("qat:")
            raise ConfigError(f"stages.{i}.{e}" if qat else f"stages.{i}.model_overrides: {e}") from None
        want = st.accumulate if st.accumulate is not None else recipe.accumulate
        accumulate[st.name] = choose_accumulation(f"stages.{i}", want, ds.global_batch, ds.seq_len, pars[i],
                                                  recipe.max_tokens_per_device, cfgs[i])
    dcfg = dataclasses.replace(dcfg, stages=stages)
    schedule = Schedule(dcfg.stages, 1, accumulate)  # global rows: data shards split them (train/feed.py)
    opt_base = unit_rate_optimizer(recipe.optimizer)
    settings = []
    for i, (st, ds) in enumerate(zip(recipe.stages, schedule.stages, strict=True)):
        key = f"stages.{i}"
        if ds.ramp is not None and ds.ramp.accumulation_steps(0) == ds.accumulate:
            raise ConfigError(f"{key}.accumulate: data stage {ds.name!r} ramps its batch in whole microbatches, "
                              f"but {ds.accumulate} microbatch(es) per step leave nothing to ramp; set accumulate "
                              "to N > 1 or auto")
        opt_cfg = _keyed(f"{key}.schedule", optim.from_dict,
                         {"total_steps": ds.steps, **recipe.optimizer, **st.schedule})
        cfg = cfgs[i]
        loss_cfg = _keyed(f"{key}.losses", losses.loss_config_from_dict, {**recipe.losses, **st.losses})
        step = StepConfig(cfg, loss_cfg, ds.micro_rows, ds.seq_len, ds.accumulate, st.trainable, st.objective)
        objective = objectives.make(st.objective, cfg, loss_cfg, f"{key}.objective")  # (its own checks)
        formats = sorted({dcfg.sources[m].format for m in ds.mixture})
        if objective.data_format is not None and formats != [objective.data_format]:
            raise ConfigError(f"{key}.objective: {st.objective} trains on {objective.data_format} sources; data stage "
                              f"{st.data_stage or st.name!r} of {recipe.data!r} reads {', '.join(formats)} sources")
        settings.append(StageSettings(i, st.name, pars[i], ds, step, opt_cfg, optim.learning_rate_schedule(opt_cfg),
                                      float(loss_cfg.bias_update_rate)))
    return Run(recipe, model_cfg, dcfg, pars[0], opt_base, settings)


def routing_table(cfg, opt: optim.OptimizerConfig | None = None) -> list[optim.Route]:
    """Every model variable's optimizer route, from abstract shapes (nothing is allocated, so the 744B model
    is fine): what `glm5 optimizer` prints."""
    from flax import nnx

    from glm5_jax.checkpoint.store import named_variables
    from glm5_jax.model import GLM5

    model = nnx.eval_shape(lambda: GLM5(cfg, rngs=nnx.Rngs(0)))
    return list(optim.route_variables(named_variables(model), cfg, opt or optim.OptimizerConfig()).values())
