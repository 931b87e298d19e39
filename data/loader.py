"""The per-process data pipeline the trainer drives: staged, packed, sharded, resumable.

Usage by a trainer::

    pipe = DataPipeline(data_config.load("default"))          # process index/count from JAX
    it = pipe.iterator()                                      # or restore its state, see below
    for step in range(start, end):
        stage = pipe.stage_at(step)                           # seq_len, rope, ... of this step
        batch = global_batch(next(it), sharding)              # dict of jax.Arrays [global_batch, seq_len]
    mngr.save(step, args=ocp.args.Composite(..., data=save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data=restore_args(it)))

Each process reads only its shard (record ``i`` of a source belongs to process ``i % process_count``), shuffles
it with a seed derived from ``(seed, stage, source)``, repeats it in freshly shuffled epochs, tokenizes,
packs and batches it with Grain. A stage's batches come from its own Grain pipeline, built when the stage
starts, so a stage switch needs no state from the stage before.
"""

from __future__ import annotations

import copy
import logging
import zlib

import grain
import jax
import numpy as np

from glm5_jax.errors import DataError

from . import config as data_config
from .errors import MAX_CONSECUTIVE_SKIPS, ErrorPolicy
from .chat import ChatEncoder, GLMRenderer
from .chat_template import TemplateRenderer
from .packing import Encoder, Finalize, pack, pack_whole
from .sources import open_source
from .stages import Schedule, Stage
from .tokenizer import build_tokenizer

log = logging.getLogger(__name__)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _mark_absl_flags_parsed():
    # grain 0.2.18's mp_prefetch reads absl flags; outside absl.app they are unparsed and reading them raises
    # UnparsedFlagAccessError. Marking them parsed keeps every flag at its default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _plain_arrays(batch: dict) -> dict:
    return {k: np.array(v) for k, v in batch.items()}


class DataPipeline:
    """Batches of one process for every step of a :class:`~glm5_jax.data.config.DataConfig`'s stages.

    ``process_index`` / ``process_count`` default to JAX's; tests pass them to simulate hosts. ``seed``
    overrides ``cfg.seed``. ``accumulate`` maps stage names to microbatches per step (the trainer's choice;
    default 1): batches are read microbatch by microbatch, and a step's rows are its microbatches in order.
    ``holdout``: ``("train", f)`` drops the fraction ``f`` of documents held out for evaluation (chosen by a
    hash of their tokens, so the same documents on every host and run), ``("eval", f)`` keeps only those. Sources are opened (files listed and indexed) here, so a missing or unreadable
    file is reported before training starts.
    """

    def __init__(self, cfg: data_config.DataConfig | str, process_index: int | None = None,
                 process_count: int | None = None, seed: int | None = None, accumulate: dict | None = None,
                 holdout: tuple[str, float] | None = None):
        self.cfg = data_config.load(cfg) if isinstance(cfg, str) else cfg
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is not in [0, {self.process_count})")
        self.seed = self.cfg.seed if seed is None else seed
        self.holdout = None if holdout is None or not holdout[1] else holdout
        self.tokenizer = build_tokenizer(self.cfg.tokenizer)
        self.policy = ErrorPolicy(self.cfg.on_error)
        self._accumulate = accumulate
        self.schedule = Schedule(self.cfg.stages, self.process_count, accumulate)
        used = dict.fromkeys(name for s in self.cfg.stages for name in s.mixture)
        self.sources = {name: open_source(self.cfg.sources[name], self.policy) for name in used}
        # Chat renderers are built here so a missing special token or a broken template fails before training.
        self.renderers = {name: self._renderer(self.cfg.sources[name]) for name in used
                          if self.cfg.sources[name].format == "chat"}
        for name, source in self.sources.items():
            check_usable(name, source, self._encoder(name, _FirstBad(), None, PROBE_RECORDS + 1))
            if len(source) < self.process_count:
                raise DataError(f"source {name}: {len(source)} records cannot be sharded over "
                                f"{self.process_count} processes")

    def sharded(self, count: int, index: int = 0) -> DataPipeline:
        """This pipeline as data shard `index` of `count` (data/shards.py): the same opened sources."""
        shard = copy.copy(self)
        shard.process_index, shard.process_count = index, count
        if count != self.process_count:
            shard.schedule = Schedule(self.cfg.stages, count, self._accumulate)
            for name, source in self.sources.items():
                if len(source) < count:
                    raise DataError(f"source {name}: {len(source)} records cannot be read as {count} data shards")
        return shard

    def _encoder(self, name: str, policy: ErrorPolicy, seq_len: int | None, limit: int) -> Encoder:
        """The encoder of source `name`'s records; `seq_len` None: conversations of any length fit."""
        src = self.cfg.sources[name]
        if name in self.renderers:
            return ChatEncoder(name, self.tokenizer, policy, self.renderers[name], seq_len or 2**62, src.overlong,
                               limit)
        return Encoder(name, self.tokenizer, policy, src.append_eos, limit)

    def _renderer(self, source_cfg):
        if source_cfg.template is None:
            return GLMRenderer(self.tokenizer)
        return TemplateRenderer(source_cfg.template, self.tokenizer)

    def is_chat(self, stage: Stage) -> bool:
        """Whether a stage packs whole conversations (its sources are chat sources) rather than documents."""
        return any(name in self.renderers for name in stage.mixture)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer emits; the model's vocab_size must be at least this."""
        return self.tokenizer.vocab_size

    def stage_at(self, step: int) -> Stage:
        return self.schedule.at(step)

    def dataset(self, stage: Stage | int | str) -> grain.IterDataset:
        """The endless Grain dataset of this process's batches for one stage."""
        if isinstance(stage, str):
            stage = self.schedule.by_name(stage)
        elif isinstance(stage, int):
            stage = self.schedule.stages[stage]
        cfg = self.cfg
        parts, weights = [], []
        for j, (name, weight) in enumerate(stage.mixture.items()):
            ds = grain.MapDataset.source(self.sources[name])[self.process_index::self.process_count]
            if cfg.shuffle:
                ds = ds.shuffle(seed=_derived_seed(self.seed, stage.index, j))
            shard_len = len(ds)
            ds = ds.repeat(None)  # reshuffled every epoch
            # Bad records in a row that prove a source unusable: a reader sees every record of the shard at
            # least once in any two epochs (a worker, in 2 * num_workers epochs' worth).
            limit = min(2 * shard_len * max(cfg.num_workers, 1) + cfg.read_buffer_size, MAX_CONSECUTIVE_SKIPS)
            ds = ds.map(self._encoder(name, self.policy, stage.seq_len, limit))
            if self.holdout is not None:
                ds = ds.map(HoldoutSplit(*self.holdout, name, limit))
            parts.append(ds)
            weights.append(weight)
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.read_buffer_size))
        it = pack_whole(it, stage.seq_len, stage.local_micro_rows) if self.is_chat(stage) else pack(it, stage.seq_len)
        it = it.batch(stage.local_micro_rows, drop_remainder=True)
        it = it.map(Finalize(self.tokenizer.pad_id))
        if cfg.num_workers:
            _mark_absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                             per_worker_buffer_size=cfg.worker_buffer_size))
            # Batches arrive in shared-memory arrays the workers allocated; plain copies let that memory go at
            # once instead of whenever (or, at interpreter exit, never) the trainer drops the batch.
            it = it.map(_plain_arrays)
        return it

    def iterator(self, start_step: int = 0) -> PipelineIterator:
        """Batches from global step ``start_step`` on.

        Starting inside a stage replays that stage from its first step (exact but O(steps)); to resume a
        run, restore the saved iterator state instead (:func:`restore_args`).
        """
        return PipelineIterator(self, start_step)


PROBE_RECORDS = 1000  # records of each source read when the pipeline is built, until one is usable


class _FirstBad(ErrorPolicy):
    """Skips bad records silently, keeping the first (the probe of `check_usable`)."""

    def __init__(self):
        super().__init__("skip")
        self.first = None

    def handle(self, source: str, bad) -> None:
        self.first = self.first or bad


def check_usable(name: str, source, encoder: Encoder) -> None:
    """Raise DataError unless one of the first PROBE_RECORDS records of `source` (in file order) encodes into a
    document: a source with no usable record is found when the pipeline is built, before a train step compiles,
    and reported in one line without a warning per skipped record."""
    n = min(len(source), PROBE_RECORDS)
    for i in range(n):
        if encoder(source[i]) is not None:
            return
    bad = encoder.policy.first
    first = f"first: {bad.where}: {bad.reason}" if bad is not None else "none of them is a document"
    raise DataError(f"source {name}: no usable record in {'its' if n == len(source) else 'the first'} {n} records, "
                    f"so nothing to train on ({first})")


class HoldoutSplit:
    """Documents of one side of a deterministic split: a document is held out when the CRC-32 of its token
    ids, as a fraction of 2**32, is below ``fraction``. ``keep``: "train" (the rest) or "eval" (held out).
    ``limit`` documents in a row on the other side mean this side of the source is empty: a `DataError`."""

    def __init__(self, keep: str, fraction: float, source: str, limit: int):
        if keep not in ("train", "eval"):
            raise ValueError(f"holdout side must be train or eval; got {keep!r}")
        self.keep, self.fraction, self.source, self.limit = keep, float(fraction), source, limit
        self.other = 0  # documents in a row that belong to the other side

    def __call__(self, doc):
        if doc is None:
            return None
        if (zlib.crc32(doc["input_ids"].tobytes()) < self.fraction * 2**32) == (self.keep == "eval"):
            self.other = 0
            return doc
        self.other += 1
        if self.other >= self.limit:
            side = "held-out" if self.keep == "eval" else "training"
            raise DataError(f"source {self.source}: no {side} document in {self.other} documents in a row "
                            f"(holdout fraction {self.fraction:g}); change eval.holdout")
        return None


class PipelineIterator(grain.DatasetIterator):
    """Yields one batch per global step, switching stage at stage boundaries; its state is JSON.

    A step's batch is its stage's ``count(step)`` microbatches of ``local_micro_rows`` rows, concatenated:
    [count x local_micro_rows, seq_len] (microbatch i is rows i * local_micro_rows onwards).

    A Grain ``DatasetIterator``, so ``grain.checkpoint.CheckpointSave/Restore`` (and Orbax) save and restore
    it: the state is the next step, its stage, and that stage's Grain iterator state.
    """

    def __init__(self, pipeline: DataPipeline, start_step: int = 0):
        super().__init__()
        self._pipeline = pipeline
        self._step = start_step
        stage = pipeline.stage_at(start_step)
        self._stage = stage.index
        self._it = iter(pipeline.dataset(stage))
        for _ in range(sum(stage.count(s) for s in range(stage.start_step, start_step))):
            next(self._it)

    @property
    def step(self) -> int:
        """The global step of the next batch."""
        return self._step

    @property
    def stage(self) -> Stage:
        """The stage of the next batch."""
        return self._pipeline.stage_at(self._step)

    def _switch(self, index: int):
        self._it.close()
        self._stage = index
        self._it = iter(self._pipeline.dataset(index))

    def __next__(self) -> dict:
        stage = self._pipeline.stage_at(self._step)
        if stage.index != self._stage:
            log.info("data: stage %s (seq_len %d, %d rows per process) from step %d", stage.name,
                     stage.seq_len, stage.local_batch, self._step)
            self._switch(stage.index)
        parts = [next(self._it) for _ in range(stage.count(self._step))]
        self._step += 1
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        stage = self._pipeline.schedule.stages[self._stage]
        return {"step": self._step, "stage": self._stage, "stage_name": stage.name, "seq_len": stage.seq_len,
                "process_index": self._pipeline.process_index, "process_count": self._pipeline.process_count,
                "stage_state": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        stages = self._pipeline.schedule.stages
        index = int(state["stage"])
        if index >= len(stages) or stages[index].name != state["stage_name"] or \
                stages[index].seq_len != state["seq_len"]:
            raise DataError(f"data iterator state is from stage {state['stage_name']!r} (seq_len {state['seq_len']})"
                            f" at position {index}, which the data config's stages do not match")
        if (state["process_index"], state["process_count"]) != (self._pipeline.process_index,
                                                                 self._pipeline.process_count):
            raise DataError(f"data iterator state is of process {state['process_index']} of "
                            f"{state['process_count']}; this is process {self._pipeline.process_index} of "
                            f"{self._pipeline.process_count}")
        self._switch(index)
        self._it.set_state(state["stage_state"])
        self._step = int(state["step"])

    def start_prefetch(self) -> None:
        self._it.start_prefetch()

    def close(self) -> None:
        self._it.close()
        super().close()


def save_args(iterator: PipelineIterator):
    """Orbax args saving the iterator state (one JSON file per process); use inside ``ocp.args.Composite``."""
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: PipelineIterator):
    """Orbax args restoring the state into ``iterator`` in place (its next batch is the saved next step)."""
    return grain.checkpoint.CheckpointRestore(iterator)


def batch_sharding(mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...] = ("data", "fsdp")):
    """``NamedSharding`` splitting the batch dimension over those of ``batch_axes`` the mesh has."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    spec = jax.sharding.PartitionSpec(axes or None, None)
    return jax.sharding.NamedSharding(mesh, spec)


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Assemble every process's local rows into global ``jax.Array``s (rows in process order)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
