"""Held-out evaluation: the train step's loss terms on data the run does not train on, no update.

During training (`Evaluator`, the recipe's `eval` section) every evaluation of a stage reads the same
held-out microbatches (in the stage's sequence length and microbatch shape) and logs `eval/loss`,
`eval/lm`, `eval/ppl` (exp of the LM loss) to JSONL and TensorBoard. `evaluate_checkpoint` is `glm5 eval`:
the same for any checkpoint (a run's, or one converted from HF) on a data config's stage.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from glm5_jax.data import config as data_config
from glm5_jax.data import shards as shards_lib
from glm5_jax.data.loader import DataPipeline
from glm5_jax.data.tokenizer import build_tokenizer
from glm5_jax.train.setup import check_vocab


def eval_data(data_cfg, stage_name: str, seq_len: int, rows: int, holdout: float = 0.0, shards: int = 1):
    """A one-stage pipeline of `rows` x `seq_len` microbatches read as `shards` data shards (data/shards.py):
    `data_cfg`'s stage `stage_name` (or its first), restricted to the held-out documents when `holdout` > 0."""
    by_name = {s.name: s for s in data_cfg.stages}
    base = by_name.get(stage_name, data_cfg.stages[0])
    one = dataclasses.replace(base, name=stage_name, seq_len=seq_len, tokens_per_step=rows * seq_len,
                              tokens=rows * seq_len, batch_ramp=None)
    return DataPipeline(dataclasses.replace(data_cfg, stages=[one]), process_index=0, process_count=shards,
                        holdout=("eval", holdout) if holdout else None)


def device_batches(pipe: DataPipeline, program, microbatches: int) -> list:
    """`microbatches` microbatches of the pipeline's stage as (device batch [accumulate, rows, L], count); this
    process reads only the data shards its devices hold rows of."""
    import copy

    import jax

    spec, shards = program.spec, pipe.process_count
    span = shards_lib.process_rows(program.batch_sharding, spec.batch_shape)[jax.process_index()]
    micro = {}
    for k in shards_lib.needed_shards(span, spec.rows, shards):
        shard = copy.copy(pipe)
        shard.process_index = k
        it = iter(shard.dataset(0))
        try:
            micro[k] = [next(it) for _ in range(microbatches)]
        finally:
            it.close()
    a = spec.accumulate
    fields = list(spec.fields)
    return [shards_lib.place({k: {key: np.concatenate([m[key] for m in ms[i:i + a]]) for key in fields}
                              for k, ms in micro.items()}, fields, program.batch_sharding, a, spec.rows,
                             spec.seq_len, shards) for i in range(0, microbatches, a)]


def auto_shards(program) -> int:
    """One data shard per distinct row block the processes hold (1 on one process)."""
    spec = program.spec
    return shards_lib.auto_shards(shards_lib.process_rows(program.batch_sharding, spec.batch_shape), spec.rows)


def run_eval(program, params, buffers, batches) -> dict:
    """Token-weighted means of the loss and LM loss over `batches`, and the perplexity exp(lm)."""
    import jax

    results = jax.device_get([program.evaluate(params, buffers, b, n) for b, n in batches])
    tokens = sum(int(r["tokens"]) for r in results)
    mean = lambda k: sum(float(r[k]) * int(r["tokens"]) for r in results) / max(tokens, 1)
    lm = mean("lm")
    return {"loss": mean("loss"), "lm": lm, "ppl": math.exp(min(lm, 700.0)), "tokens": tokens}


def eval_due(cfg, step: int, stage_end: bool) -> bool:
    """Whether the recipe's `eval` section (`cfg`) asks for an evaluation after step `step`."""
    return (cfg.interval_steps is not None and step % cfg.interval_steps == 0) or (cfg.at_stage_end and stage_end)


class Evaluator:
    """The recipe's `eval` section during training: when to evaluate, and on which held-out microbatches."""

    def __init__(self, run, shards: int = 1):
        self.run, self.cfg, self.shards = run, run.recipe.eval, shards
        self.source = run.data_cfg if self.cfg.data is None else data_config.load(self.cfg.data)
        check_vocab("eval.data", build_tokenizer(self.source.tokenizer).vocab_size, run.model_cfg)
        self._batches: dict = {}

    def due(self, step: int, stage_end: bool) -> bool:
        return eval_due(self.cfg, step, stage_end)

    def run_at(self, stage, program, params, buffers) -> dict:
        """{"loss", "lm", "ppl", "tokens"} of the stage's held-out microbatches (the same ones every time)."""
        if stage.name not in self._batches:
            d = stage.data
            pipe = eval_data(self.source, stage.name, d.seq_len, d.micro_rows, self.cfg.holdout, self.shards)
            self._batches[stage.name] = device_batches(pipe, program, self.cfg.batches)
        return run_eval(program, params, buffers, self._batches[stage.name])


def evaluate_checkpoint(checkpoint: str, data: str, stage: str | None = None, batches: int = 8,
                        step: int | None = None, layout: str | None = None, data_overrides=(),
                        holdout: float = 0.0, objective: str = "pretrain") -> dict:
    """`glm5 eval`: loss and perplexity of a checkpoint on `batches` steps' worth of rows of a data config's
    stage, one step's rows at a time (only its held-out documents with `holdout` > 0: those a run with
    `eval.holdout` of that value skipped). The step is the one a one-stage recipe of that checkpoint, data
    stage, layout and objective trains (`build_step`), with the checkpoint step's own model config."""
    from glm5_jax.checkpoint.manager import load_variables
    from glm5_jax.checkpoint.store import CheckpointReader
    from glm5_jax.errors import ConfigError
    from glm5_jax.train import recipe as recipe_lib
    from glm5_jax.train.setup import resolve
    from glm5_jax.train.step import build_step
    from glm5_jax.values import dotted_values

    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout: must be a fraction in [0, 1); got {holdout}")
    reader = CheckpointReader(checkpoint, step)
    dcfg = data_config.load(data, data_overrides)
    st = dcfg.stage(stage) if stage else dcfg.stages[0]
    recipe = recipe_lib.from_dict({
        "model": None, "init_from": checkpoint, "layout": layout, "data": data,
        "data_overrides": {**dotted_values(data_overrides),  # one step's rows at a time: no batch ramp
                           f"stages.{dcfg.stages.index(st)}.batch_ramp": None},
        "stages": [{"name": st.name, "steps": 1, "objective": objective,
                    "model_overrides": reader.config.to_dict()}]})  # (the step's config, RoPE as it trained)
    try:
        run = resolve(recipe)
    except ConfigError as e:
        raise ConfigError(str(e).replace("stages.0.", f"--data stage {st.name}: ").replace("layout:", "--layout:",
                                                                                             1)) from None
    check_vocab("--data", build_tokenizer(dcfg.tokenizer).vocab_size, run.model_cfg)
    program = build_step(run, run.stages[0])
    pipe = eval_data(dcfg, st.name, st.seq_len, program.spec.rows, holdout, auto_shards(program))
    from glm5_jax.memory import check_fits

    check_fits(f"{reader.directory} step {reader.step}: the model's parameters", program.abstract_variables())
    variables = load_variables(reader.directory, program.abstract_variables(), key="--checkpoint", step=reader.step)
    params = {k: variables[k] for k in program.param_shardings}
    buffers = {k: variables[k] for k in program.buffer_shardings}
    result = run_eval(program, params, buffers, device_batches(pipe, program, batches))
    return {"checkpoint": reader.directory, "step": reader.step, "stage": st.name, "seq_len": st.seq_len,
            "rows": program.spec.rows, "batches": batches, **result}
