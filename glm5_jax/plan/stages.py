"""Every stage of a recipe planned with the step that trains it.

Each stage is resolved by `glm5_jax.train.setup.resolve`, the function `glm5 train` resolves its run with
(the recipe cut down to that one stage: a stage's settings do not depend on the others), so the plan compiles
exactly the stage's program: its layout, sequence length, rows per step, accumulation, RoPE, losses (the DSA
warm-up's dense attention and indexer KL, sparse adaptation's top-k with KL) and trainable set. A stage whose
batch cannot be split, or whose program the compiler refuses for memory, keeps its row with the reason.
"""

from __future__ import annotations

import dataclasses
import time

from glm5_jax.errors import ConfigError
from glm5_jax.plan.devices import Target
from glm5_jax.plan.measure import PlanResult, measure, step_inputs


@dataclasses.dataclass
class StagePlan:
    """One row of the stage table: the stage's plan, or why it has none."""

    index: int
    name: str
    layout: str  # the layout's name and mesh
    seq_len: int | None = None
    rows: int | None = None  # rows per step (all microbatches)
    accumulate: int | None = None
    micro_rows: int | None = None
    dsa: str = "sparse"
    trainable: str = "all"
    result: PlanResult | None = None
    error: str | None = None  # a stage the plan could not build (its batch does not split, ...)
    seconds: float = 0.0  # resolve + lower + compile

    @property
    def fits(self) -> bool:
        return self.result is not None and self.result.fits


def stage_names(recipe) -> list[str]:
    return [s.name for s in recipe.stages]


def select(recipe, stage: str | None) -> list[int]:
    """Indices of the stages to plan: `all`, one stage's name; None: all."""
    names = stage_names(recipe)
    if stage is None or stage == "all":
        return list(range(len(names)))
    if stage not in names:
        raise ConfigError(f"--stage: the recipe has no stage {stage!r}; stages: all, {', '.join(names)}")
    return [names.index(stage)]


def layout_name(recipe, index: int) -> str:
    st = recipe.stages[index]
    name = st.layout or recipe.layout or "(all devices on data)"
    overrides = st.layout_overrides if st.layout else {**recipe.layout_overrides, **st.layout_overrides}
    return name + (" + overrides" if overrides else "")


def stage_program(recipe, index: int, devices):
    """(the resolved one-stage run, its stage, its train step) of stage `index` as `glm5 train` builds it (the
    recipe cut down to that stage: its settings do not depend on the others). A `ConfigError` names the stage."""
    from glm5_jax.train.setup import resolve
    from glm5_jax.train.step import build_step

    one = dataclasses.replace(recipe, stages=[recipe.stages[index]], start_stage=None)
    try:
        run = resolve(one, devices)
    except ConfigError as e:
        raise ConfigError(str(e).replace("stages.0", f"stages.{index}")) from None
    return run, run.stages[0], build_step(run, run.stages[0])


def plan_stage(recipe, index: int, devices, target: Target, device_memory: int | None) -> StagePlan:
    """Resolve stage `index` as `glm5 train` would and compile its train step on `devices`."""
    from glm5_jax.sharding.mesh import describe

    start = time.perf_counter()
    row = StagePlan(index, recipe.stages[index].name, layout_name(recipe, index))
    try:
        run, stage, program = stage_program(recipe, index, devices)
    except ConfigError as e:
        row.error = str(e)
        row.seconds = time.perf_counter() - start
        return row
    spec = stage.step
    row.layout = f"{row.layout}: {describe(stage.par.mesh)}"
    row.seq_len, row.accumulate, row.micro_rows = spec.seq_len, spec.accumulate, spec.rows
    row.rows, row.dsa, row.trainable = spec.rows * spec.accumulate, spec.loss_cfg.dsa, spec.trainable
    row.result = measure(step_inputs(program, spec.model_cfg, run.opt_base), target, device_memory)
    row.seconds = time.perf_counter() - start
    return row


def plan_recipe(recipe, stage: str | None, devices, target: Target, device_memory: int | None,
                on_row=None) -> list[StagePlan]:
    """Plan the selected stages one after another; `on_row(row)` is called as each one is done."""
    rows = []
    for i in select(recipe, stage):
        rows.append(plan_stage(recipe, i, devices, target, device_memory))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def devices_needed(recipe) -> int | None:
    """Devices the recipe runs on: its `devices`, else the first stage's layout's fixed mesh size (None
    when that layout leaves an axis to the device count, `-1`)."""
    import math

    from glm5_jax.train.setup import stage_layout

    if recipe.devices is not None:
        return recipe.devices
    layout = stage_layout(recipe, 0)
    sizes = list(layout.mesh.values()) + list(layout.dcn.values())
    return None if any(s == -1 for s in sizes) else math.prod(sizes)
