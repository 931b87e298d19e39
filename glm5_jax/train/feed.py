"""This process's part of every step's global batch: which data shards it reads, the global arrays it
builds from them, and the data state a checkpoint keeps (data/shards.py explains the shards)."""

from __future__ import annotations

import jax

from glm5_jax.data import shards as shards_lib
from glm5_jax.data.loader import DataPipeline
from glm5_jax.errors import ConfigError
from glm5_jax.train.agree import gather_json
from glm5_jax.train.setup import check_vocab
from glm5_jax.train.step import BATCH_AXES


def _spans(run, stage):
    shape = stage.step.batch_shape
    return shards_lib.process_rows(run.par.sharding(BATCH_AXES, shape), shape)


def choose_shards(run, saved: int | None = None, warn=print) -> int:
    """The run's data shard count: the checkpoint's when resuming, else `data_shards`, else one per distinct
    row block the processes hold; it must divide every stage's microbatch rows."""
    first = run.stages[0]
    auto = shards_lib.auto_shards(_spans(run, first), first.step.rows)
    want = run.recipe.data_shards
    if saved is not None:
        if want is not None and want != saved:
            warn(f"WARNING: data_shards={want} ignored: the checkpoint's data is read as {saved} shards (a resumed "
                 "run keeps its data order)")
        shards = saved
    else:
        shards = auto if want is None else want
    for i, st in enumerate(run.stages):
        if st.step.rows % shards:
            raise ConfigError(f"data_shards: {shards} shards do not divide the {st.step.rows} rows of a microbatch "
                              f"of stage {i} ({st.name}); use a divisor of every stage's microbatch rows")
    return shards


def feed_opener(run, out=print):
    """`(shards, states, start_step) -> Feed`: the run's training data (its pipeline opened once, the held-out
    split left out), checked against the model's vocabulary; what `glm5 train` and `glm5 bench` read. A run
    whose stages train on rollouts reads an `RLFeed` (glm5_jax/rl/feed.py), or with `rl.asynchronous` an
    `AsyncRLFeed` (glm5_jax/rl/async_feed.py), instead."""
    from glm5_jax.rl.setup import is_rl

    if run.rl is None and any(is_rl(s) for s in run.stages):  # (glm5 bench: data stages only)
        raise ConfigError("stages: an RL stage's batches are rollouts of the weights being trained; glm5 bench "
                          "reads data stages (time an RL stage's step with glm5 plan or glm5 train)")
    if run.rl is not None:
        from glm5_jax.rl.async_feed import AsyncRLFeed
        from glm5_jax.rl.feed import RLFeed

        check_vocab("data", run.rl.tokenizer.vocab_size, run.model_cfg)
        feed = AsyncRLFeed if run.rl.asynchronous else RLFeed
        return lambda shards, states, start: feed(run, run.rl, states)
    pipe = DataPipeline(run.data_cfg, process_index=0, process_count=1,
                        accumulate={s.name: s.data.accumulate for s in run.stages},
                        holdout=("train", run.recipe.eval.holdout))
    check_vocab("data", pipe.vocab_size, run.model_cfg)
    return lambda shards, states, start: Feed(run, pipe, choose_shards(run, shards, out), start, states)


class Feed:
    """The data shards this process reads and the global batch of each step; `state()` is a collective.

    The protocol the trainer reads batches by (`RLFeed` follows it too): `next_batch(stage, state)`, `ahead`
    (whether the next step's batch may be read while a step computes), `report()` (host-side metrics of the
    batches handed out, merged into the step's record), `reset_optimizer` (the trainer resets the optimizer
    state before the batch just read, then clears it), `state()`, `close()`, `shards`, `indices`."""

    ahead = True  # batches do not depend on the weights: the next one is read while a step computes
    reset_optimizer = False  # set by a feed whose last batch is to start from fresh optimizer state

    def __init__(self, run, pipe: DataPipeline, shards: int, start_step: int = 0, states=None):
        self.run, self.shards = run, shards
        me = jax.process_index()
        needed = sorted({k for st in run.stages
                         for k in shards_lib.needed_shards(_spans(run, st)[me], st.step.rows, shards)})
        self.it = shards_lib.ShardedIterator(pipe, shards, needed, start_step, states)

    @property
    def indices(self) -> list[int]:
        return self.it.indices

    def next_batch(self, stage, state=None):
        """(global batch {key: [accumulate, rows, L]}, microbatches it takes) of the next step, in `stage`
        (`state`, the train state, is not read: text batches do not depend on the weights)."""
        spec = stage.step
        return shards_lib.place(next(self.it), list(spec.fields), self.run.par.sharding(BATCH_AXES, spec.batch_shape),
                                spec.accumulate, spec.rows, spec.seq_len, self.shards)

    def report(self) -> dict:
        """No host-side metrics: the data pipeline's counters are logged by the pipeline."""
        return {}

    def state(self) -> dict:
        """The JSON document of every shard's iterator state (gathered from all processes)."""
        merged = {}
        for part in gather_json(self.it.local_state()):
            for k, v in part.items():
                merged.setdefault(k, v)
        return shards_lib.state_document(self.shards, merged)

    def close(self):
        self.it.close()
