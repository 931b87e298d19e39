"""The one check of a parallel layout against a model and the shape it runs, before anything is traced.

`glm5 train` (per stage), `glm5 plan` and `glm5 generate` call `check_layout`; the forward pass and the
parallel pieces (sharding/) then assume what it checked. Each failure is one `ConfigError` line naming the
setting at fault (`key`, e.g. "stages.1") and what would fit.
"""

from __future__ import annotations

from glm5_jax.errors import ConfigError
from glm5_jax.model.transformer import layer_groups, pipelined_group
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.runners import runners


def check_layout(cfg, par: Parallelism, rows: int, seq_len: int | None = None, key: str = "layout",
                 accumulate: int = 1):
    """Raise unless layout `par` runs model `cfg` on `rows` rows of `seq_len` tokens as `accumulate`
    microbatches (which must split them).

    rows: a step's rows (a generation batch); seq_len: None where the length is not fixed (decoding).
    Checks: each microbatch's rows over batch shards x pipeline microbatches; the sequence
    over context shards; routed experts over expert shards; the expert matmul under pipeline x expert
    parallelism; and the pipelined group: stages x repeats chunks of its layers, no later layer reading
    its top-k.
    """
    run = runners(par)
    shards, micro, context = par.axis_size("batch"), par.config.microbatches, par.axis_size("length")
    if seq_len is not None and seq_len % context:
        raise ConfigError(f"{key}: seq_len {seq_len} does not split into {context} context shards")
    unit = shards * micro
    if rows % accumulate or (rows // accumulate) % unit:
        raise ConfigError(f"{key}: {rows} rows per step as {accumulate} microbatches do not split into {shards} "
                          f"batch shards x {micro} pipeline microbatches; use a multiple of {accumulate * unit} rows")
    if cfg.n_routed_experts % run.expert_shards:
        raise ConfigError(f"{key}: {cfg.n_routed_experts} routed experts do not split over {run.expert_shards} "
                          "expert shards")
    if cfg.expert_matmul == "tiled" and run.pipelined and run.expert_shards > 1:
        raise ConfigError("expert_matmul: 'tiled' does not run under pipeline x expert parallelism on this jax; "
                          "use ragged_dot or auto")
    if run.pipelined:
        _check_pipeline(cfg, par, key)


def _check_pipeline(cfg, par: Parallelism, key: str):
    stages, repeats, micro = par.axis_size("pipeline_stages"), par.config.pipeline_repeats, par.config.microbatches
    if micro < stages:
        raise ConfigError(f"microbatches: the pipeline needs at least one microbatch per stage; got microbatches "
                          f"{micro} for {stages} stages")
    groups = layer_groups(cfg)
    index = pipelined_group(groups)
    if groups[index].count < stages * repeats:
        raise ConfigError(f"pipeline_repeats: the pipelined group has {groups[index].count} layers, fewer than "
                          f"stages x repeats = {stages} x {repeats} chunks")
    if groups[index].indexer and any(not g.indexer for g in groups[index + 1:]):
        raise ConfigError(f"{key}: layers after the pipelined group (the last MoE run of layers) use 'shared' "
                          "indexer top-k from inside the pipeline, which the pipeline does not return; give "
                          "them a 'full' indexer or run without a pipeline")
