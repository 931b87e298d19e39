"""The benchmarked stage, built by the code `glm5 train` builds its run with: nothing here is a second step.

`load_recipe` reads the recipe (or, for a model preset, the one-stage `model_recipe` around it) before JAX
starts; `build` takes the benchmarked stage's run and train step from `glm5_jax.plan.stages.stage_program`
(the recipe cut down to that stage, resolved as `glm5 train` resolves it, the step made by
`glm5_jax.train.step.build_step`, as the trainer makes its own). `open_state` initialises the model and optimizer through the trainer's own
`restore_or_init` and data feed (`train.feed.Feed` over the run's `DataPipeline`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os

from glm5_jax.errors import ConfigError
from glm5_jax.values import apply_overrides


def model_recipe(model: str) -> dict:
    """The recipe a model preset is benchmarked with: the default data's first stage (128-token rows of the
    embedded corpus, 4,096 tokens per step), all devices on data, the recipe defaults for the rest."""
    return {"model": model, "data": "default", "stages": [{"name": "short", "steps": 1}]}


def _is_preset(folder: str, name: str) -> bool:
    return (importlib.resources.files("glm5_jax.configs") / folder / f"{name}.yaml").is_file()


def load_recipe(source: str, overrides=()):
    """The recipe `--config` names: a recipe preset or YAML file; else a model preset, benchmarked with
    `model_recipe`. Recipe `key=value` overrides apply to either. Every error is a `ConfigError` line."""
    from glm5_jax.train import recipe as recipe_lib

    if os.path.isfile(source) or _is_preset("recipes", source) or not _is_preset("models", source):
        try:
            return recipe_lib.load(source, list(overrides))
        except ConfigError as e:
            if os.path.isfile(source) or _is_preset("recipes", source):
                raise
            raise ConfigError(f"--config: {source!r} is neither a recipe nor a model preset ({e})") from None
    return recipe_lib.from_dict(apply_overrides(model_recipe(source), list(overrides)))


def stage_index(recipe, stage: str | None) -> int:
    """The position of the benchmarked stage (`--stage NAME`; default the first)."""
    names = [s.name for s in recipe.stages]
    if stage is None:
        return 0
    if stage not in names:
        raise ConfigError(f"--stage: the recipe has no stage {stage!r}; stages: {', '.join(names)}")
    return names.index(stage)


def devices_needed(recipe, index: int) -> int | None:
    """Devices stage `index` runs on (`glm5 plan`'s rule: `devices`, else its layout's fixed size; None: the
    layout takes every device there is)."""
    from glm5_jax.plan.stages import devices_needed as needed

    return needed(dataclasses.replace(recipe, stages=[recipe.stages[index]]))


@dataclasses.dataclass
class Bench:
    """The benchmarked stage: the resolved one-stage run, its stage settings and its train step."""

    recipe: object  # the one-stage recipe (glm5_jax.train.recipe.Recipe)
    run: object  # glm5_jax.train.setup.Run of that recipe
    stage: object  # its StageSettings
    abstract: object  # the base model's abstract state (train.step.ModelState)
    program: object  # train.step.TrainStep of the stage (not yet compiled)

    @property
    def device(self):
        return self.run.par.mesh.devices.flat[0]

    @property
    def n_devices(self) -> int:
        return int(self.run.par.mesh.devices.size)


def build(recipe, index: int) -> Bench:
    """Resolve stage `index` of `recipe` as `glm5 train` would and make its train step."""
    from glm5_jax.plan.stages import stage_program

    one = dataclasses.replace(recipe, compilation_cache=None)
    run, stage, program = stage_program(one, index, None)
    return Bench(run.recipe, run, stage, program.abstract, program)


def open_feed(bench: Bench, out=print):
    """`(shards, states, start) -> Feed`: the trainer's data feed of the run (`train.feed.feed_opener`)."""
    from glm5_jax.train.feed import feed_opener

    return feed_opener(bench.run, out)


def open_state(bench: Bench, checkpoints: str, feed, out=print):
    """(run_state.TrainState, data feed, CheckpointManager) of a fresh run in `checkpoints`, by `run_state.restore_or_init`
    (a directory without checkpoints: the model initialised sharded, the optimizer state created on device)."""
    from glm5_jax.train.run_state import open_checkpoints, restore_or_init

    ckpt = open_checkpoints(bench.recipe, checkpoints)
    state, it = restore_or_init(bench.run, ckpt, bench.program, feed, out)
    return state, it, ckpt
