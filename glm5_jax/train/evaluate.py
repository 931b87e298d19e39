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
from glm5_jax.data.pipeline import DataPipeline, global_batch


def eval_data(data_cfg, stage_name: str, seq_len: int, rows: int, holdout: float = 0.0):
    """A one-stage pipeline of `rows` x `seq_len` microbatches: `data_cfg`'s stage `stage_name` (or its
    first), restricted to the held-out documents when `holdout` > 0."""
    by_name = {s.name: s for s in data_cfg.stages}
    base = by_name.get(stage_name, data_cfg.stages[0])
    one = dataclasses.replace(base, name=stage_name, seq_len=seq_len, tokens_per_step=rows * seq_len,
                              tokens=rows * seq_len, batch_ramp=None)
    return DataPipeline(dataclasses.replace(data_cfg, stages=[one]), holdout=("eval", holdout) if holdout else None)


def device_batches(pipe: DataPipeline, program, microbatches: int) -> list:
    """`microbatches` microbatches of the pipeline's stage as (device batch [accumulate, rows, L], count)."""
    a = program.spec.accumulate
    it = iter(pipe.dataset(0))
    try:
        micro = [next(it) for _ in range(microbatches)]
    finally:
        it.close()
    out = []
    for start in range(0, len(micro), a):
        group = micro[start:start + a]
        arrays = {k: np.zeros((a, *group[0][k].shape), np.int32) for k in ("input_ids", "targets", "positions",
                                                                          "segment_ids")}
        for i, m in enumerate(group):
            for k in arrays:
                arrays[k][i] = m[k]
        out.append((global_batch(arrays, program.batch_sharding), len(group)))
    return out


def run_eval(program, params, rest, batches) -> dict:
    """Token-weighted means of the loss and LM loss over `batches`, and the perplexity exp(lm)."""
    import jax

    results = jax.device_get([program.evaluate(params, rest, b, n) for b, n in batches])
    tokens = sum(int(r["tokens"]) for r in results)
    mean = lambda k: sum(float(r[k]) * int(r["tokens"]) for r in results) / max(tokens, 1)
    lm = mean("lm")
    return {"loss": mean("loss"), "lm": lm, "ppl": math.exp(min(lm, 700.0)), "tokens": tokens}


class Evaluator:
    """The recipe's `eval` section during training."""

    def __init__(self, run, log):
        self.run, self.cfg, self.log = run, run.recipe.eval, log
        self.source = run.data_cfg if self.cfg.data is None else data_config.load(self.cfg.data)
        self._batches: dict = {}

    def due(self, step: int, stage_end: bool) -> bool:
        c = self.cfg
        return (c.interval_steps is not None and step % c.interval_steps == 0) or (c.at_stage_end and stage_end)

    def run_at(self, step: int, stage, program, params, rest) -> dict:
        if stage.name not in self._batches:
            d = stage.data
            pipe = eval_data(self.source, stage.name, d.seq_len, d.micro_rows, self.cfg.holdout)
            self._batches[stage.name] = device_batches(pipe, program, self.cfg.batches)
        result = run_eval(program, params, rest, self._batches[stage.name])
        self.log.write_eval({"step": step, "stage": stage.name, **result})
        return result


def evaluate_checkpoint(checkpoint: str, data: str, stage: str | None = None, batches: int = 8,
                        step: int | None = None, layout: str | None = None, data_overrides=(),
                        holdout: float = 0.0) -> dict:
    """`glm5 eval`: loss and perplexity of a checkpoint on `batches` microbatches of a data config's stage
    (only its held-out documents with `holdout` > 0: those a run with `eval.holdout` of that value skipped)."""
    import jax

    from glm5_jax.checkpoint.manager import load_variables
    from glm5_jax.checkpoint.naming import flatten
    from glm5_jax.checkpoint.store import CheckpointReader
    from glm5_jax.config import ConfigError
    from glm5_jax.sharding.context import Parallelism
    from glm5_jax.sharding.layout import load_layout
    from glm5_jax.train import losses
    from glm5_jax.train import step as S

    reader = CheckpointReader(checkpoint, step)
    cfg = reader.config
    dcfg = data_config.load(data, data_overrides)
    st = dcfg.stage(stage) if stage else dcfg.stages[0]
    par = Parallelism.create(load_layout(layout), jax.devices())
    shards = par.axis_size("batch") * par.config.microbatches
    rows = st.global_batch
    if rows % shards:
        raise ConfigError(f"--data: stage {st.name} has {rows} rows per step, which do not split into {shards} "
                          "batch shards; choose a layout or stage that fits")
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout: must be a fraction in [0, 1); got {holdout}")
    pipe = eval_data(dcfg, st.name, st.seq_len, rows, holdout)
    if pipe.vocab_size > cfg.vocab_size:
        raise ConfigError(f"--data: the tokenizer emits {pipe.vocab_size} ids but the model's vocab_size is "
                          f"{cfg.vocab_size}")
    abstract = S.abstract_state(cfg)
    program = S.EvalStep(S.StepConfig(cfg, losses.LossConfig(), rows, st.seq_len), par, abstract)
    targets = {**{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.param_shardings[k])
                  for k, v in flatten(abstract.params).items()},
               **{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.rest_shardings[k])
                  for k, v in flatten(abstract.rest).items()}}
    variables = load_variables(reader.directory, targets)
    params = {k: variables[k] for k in program.param_shardings}
    rest = {k: variables[k] for k in program.rest_shardings}
    result = run_eval(program, params, rest, device_batches(pipe, program, batches))
    return {"checkpoint": reader.directory, "step": reader.step, "stage": st.name, "seq_len": st.seq_len,
            "rows": rows, "batches": batches, **result}
