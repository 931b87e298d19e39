"""A run's state across checkpoints: what a training checkpoint step holds (`ITEMS`), how the trainer saves it
(`save_state`), and how a run starts (`restore_or_init`: its newest readable checkpoint, else `init_from` or a
fresh initialisation). `glm5 train` and `glm5 bench` both use these.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from glm5_jax.checkpoint.manager import ARRAYS, DOCUMENT, CheckpointManager, load_variables
from glm5_jax.checkpoint.naming import flatten, nest, unnest
from glm5_jax.data.shards import parse_state
from glm5_jax.errors import ConfigError
from glm5_jax.memory import check_fits
from glm5_jax.train import step as S
from glm5_jax.train.recipe import Recipe
from glm5_jax.train.setup import Run, StageSettings, is_hf_directory


@dataclasses.dataclass
class TrainState:
    step: int  # optimizer steps done
    params: dict  # {dotted name: jax.Array}, trained
    buffers: dict  # router bias buffers, moved by the load-balancing rule
    opt_state: object
    counters: dict  # nonfinite_in_a_row, skipped_total, tokens_seen, rng (saved as the `train` item)


# What a training checkpoint step holds (docs/training.md#checkpoints).
ITEMS = {"params": ARRAYS,  # every model variable (parameters and router bias buffers), nested dotted names
         "opt_state": ARRAYS,  # the optimizer state, sharded like the parameters
         "train": DOCUMENT,  # step, stage, RNG key, non-finite counters, tokens seen
         "data": DOCUMENT,  # the data feed's state (its shard count and every shard's iterator state)
         "config": DOCUMENT,  # the model config of the step's stage (RoPE as trained)
         "recipe": DOCUMENT}  # the resolved recipe


def open_checkpoints(recipe: Recipe, directory: str) -> CheckpointManager:
    """The run's checkpoint manager in `directory`, holding `ITEMS`, with the recipe's save policy."""
    return CheckpointManager(directory, recipe.checkpoint, ITEMS)


def save_state(ckpt: CheckpointManager, state: TrainState, stage: StageSettings, it, recipe: Recipe):
    """Checkpoint `state` at its step: trained in `stage` (whose model config, RoPE included, is saved), data
    feed `it` (its state is a collective), the recipe."""
    ckpt.save(state.step, {"params": nest({**state.params, **state.buffers}), "opt_state": state.opt_state,
                           "train": {**state.counters, "step": state.step, "stage": stage.name}, "data": it.state(),
                           "config": stage.step.model_cfg.to_dict(), "recipe": recipe.to_dict()})


def initial_checkpoint(run: Run, run_dir: str, out) -> str:
    """The checkpoint `init_from` names; a transformers directory is converted once, to RUN_DIR/init-from-hf
    (with the recipe's model overrides, e.g. param_dtype), and read from there."""
    source = run.recipe.init_from
    if not is_hf_directory(source):
        return source
    if jax.process_count() > 1:
        raise ConfigError(f"init_from: {source} is a transformers directory, which one process converts; convert "
                          "it first (glm5 convert hf-to-orbax --hf-dir DIR --out CKPT) and set init_from=CKPT")
    from glm5_jax.convert.hf import hf_to_orbax

    converted = os.path.join(run_dir, "init-from-hf")
    if not os.path.isdir(converted):
        out(f"converting {os.path.abspath(source)} to {converted} (init_from a transformers directory)")
        overrides = {k: v for k, v in run.model_cfg.to_dict().items() if k in run.recipe.model_overrides}
        hf_to_orbax(source, converted, overrides=overrides, show_progress=False)
    return converted


def restore_or_init(run: Run, ckpt: CheckpointManager, program: S.TrainStep, open_feed, out):
    """The run's state and data feed: from its newest readable checkpoint, else initialised (from
    `init_from` when set), at `start_stage` when that lies ahead. `open_feed(shards or None, states or None,
    start_step)`: the data feed."""
    recipe = run.recipe
    params_abs, buffers_abs, opt_abs, *_ = program.abstract_args()
    check_fits("the model and optimizer state", (params_abs, buffers_abs, opt_abs))

    variables_abs = {**params_abs, **buffers_abs}
    found = ckpt.restore_latest({"params": nest(variables_abs), "opt_state": opt_abs},
                                lambda restored: open_feed(*parse_state(restored["data"]), 0),
                                warn=lambda m: out(f"WARNING: {m}"))
    if found is not None:
        step, restored, it = found
        variables, opt_state, saved = unnest(restored["params"]), restored["opt_state"], dict(restored["train"])
    else:
        if recipe.init_from:
            variables = load_variables(initial_checkpoint(run, os.path.dirname(ckpt.directory), out), variables_abs)
        else:
            state = S.init_sharded(run.model_cfg, run.par, recipe.seed)
            variables = {**flatten(state.params), **flatten(state.buffers)}
        step, saved, it = None, {}, open_feed(None, None, 0)
        opt_state = program.init_optimizer({k: variables[k] for k in params_abs})
    counters = {"nonfinite_in_a_row": 0, "skipped_total": 0, "tokens_seen": 0,
                "rng": np.asarray(jax.random.key_data(jax.random.key(recipe.seed))).tolist()}
    counters.update({k: saved[k] for k in counters if k in saved})
    start = run.start_step
    if step is not None:
        out(f"resumed from {ckpt.directory} step {step}")
    elif recipe.init_from:
        out(f"initialised from {os.path.abspath(recipe.init_from)}")
    if start > (step or 0):
        out(f"start_stage {recipe.start_stage}: from step {step or 0} to the stage's first step {start}")
        shards = it.shards
        it.close()
        it, step = open_feed(shards, None, start), start
    state = TrainState(step or 0, {k: variables[k] for k in params_abs}, {k: variables[k] for k in buffers_abs},
                       opt_state, counters)
    return state, it
