"""Data shards: the global batch of every step, read by several processes exactly as one process reads it.

The rows of every microbatch are cut into `shards` equal blocks; block k is read by the pipeline of data
shard k of `shards` (records ``k::shards`` of every source, its own shuffle, packing and batches: a
`DataPipeline` with process index k of count `shards`). What a step's batch holds therefore depends only
on the data config and the shard count, never on how many processes read it: one process reading all
shards assembles the same global batch as N processes reading one each.

Each process reads the shards whose rows its devices hold (`needed_shards`, from the batch sharding), and
`place` builds the global `jax.Array` from them. The default shard count is the number of distinct row
blocks the processes hold (1 on one process, so a single-process run reads as it always did); a resumed run
keeps the count it was saved with. The iterator states of all shards are saved as one JSON document
(`gather_state`), so a checkpoint resumes on any number of processes.
"""

from __future__ import annotations


import jax
import numpy as np

from glm5_jax.errors import DataError

from .loader import DataPipeline, PipelineIterator

def process_rows(sharding: jax.sharding.Sharding, shape: tuple, dim: int = 1) -> dict[int, tuple[int, int]]:
    """{process index: (first row, end row)} of dimension `dim` that each process's devices hold."""
    spans: dict[int, set] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        s = index[dim]
        lo, hi = (s.start or 0), (shape[dim] if s.stop is None else s.stop)
        spans.setdefault(device.process_index, set()).add((lo, hi))
    out = {}
    for p, blocks in spans.items():
        lo, hi = min(b[0] for b in blocks), max(b[1] for b in blocks)
        covered = sum(b - a for a, b in _merge(blocks))
        if covered != hi - lo:
            raise DataError(f"the batch rows of process {p} are not contiguous ({sorted(blocks)}); this layout's "
                            "device order cannot be fed per process")
        out[p] = (lo, hi)
    return out


def _merge(blocks):
    merged = []
    for a, b in sorted(blocks):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def auto_shards(rows_by_process: dict[int, tuple[int, int]], rows: int) -> int:
    """One shard per distinct row block the processes hold (they must cut the rows into equal blocks)."""
    spans = sorted(set(rows_by_process.values()))
    sizes = {b - a for a, b in spans}
    if len(sizes) != 1 or sum(b - a for a, b in spans) != rows:
        raise DataError(f"the processes hold unequal or overlapping row blocks {spans} of {rows} rows")
    return len(spans)


def needed_shards(span: tuple[int, int], rows: int, shards: int) -> list[int]:
    """The data shards whose rows overlap this process's row span (rows per microbatch `rows`)."""
    per = rows // shards
    return list(range(span[0] // per, (span[1] - 1) // per + 1))


class ShardedIterator:
    """This process's data shards, step by step: `next()` gives {shard: rows of the step}."""

    def __init__(self, pipe: DataPipeline, shards: int, indices: list[int], start_step: int = 0,
                 states: dict | None = None):
        self.shards, self.indices = shards, list(indices)
        self.iterators: dict[int, PipelineIterator] = {}
        try:
            for k in self.indices:
                it = pipe.sharded(shards, k).iterator(start_step if states is None else 0)
                self.iterators[k] = it
                if states is not None:
                    if str(k) not in states:
                        raise DataError(f"the saved data state has no shard {k} (of {shards})")
                    it.set_state(states[str(k)])
        except BaseException:
            self.close()
            raise

    @property
    def step(self) -> int:
        return next(iter(self.iterators.values())).step

    def __iter__(self):
        return self

    def __next__(self) -> dict[int, dict]:
        return {k: next(it) for k, it in self.iterators.items()}

    def local_state(self) -> dict[str, dict]:
        return {str(k): it.get_state() for k, it in self.iterators.items()}

    def close(self):
        for it in self.iterators.values():
            it.close()
        self.iterators = {}


def place(blocks: dict[int, dict], keys, sharding, accumulate: int, rows: int, seq_len: int, shards: int):
    """The step's global batch {key: jax.Array [accumulate, rows, seq_len]} from this process's shard
    blocks ({shard: {key: [count * rows / shards, seq_len]}}), and the count of microbatches it takes (slots
    past the count are zero: the step never reads them)."""
    per = rows // shards
    counts = {len(b[keys[0]]) // per for b in blocks.values()}
    if len(counts) != 1:
        raise DataError(f"data shards gave different numbers of microbatches: {sorted(counts)}")
    count = counts.pop()
    shaped = {k: {key: np.asarray(b[key]).reshape(count, per, seq_len) for key in keys} for k, b in blocks.items()}
    shape = (accumulate, rows, seq_len)

    def array(key):
        def rows_of(index):
            a_slice, r_slice, l_slice = index
            lo, hi = r_slice.start or 0, rows if r_slice.stop is None else r_slice.stop
            out = np.zeros((accumulate, hi - lo, seq_len), np.int32)
            for k in range(lo // per, (hi - 1) // per + 1):
                a, b = max(lo, k * per), min(hi, (k + 1) * per)
                out[:count, a - lo:b - lo] = shaped[k][key][:, a - k * per:b - k * per]
            return out[a_slice, :, l_slice]
        return jax.make_array_from_callback(shape, sharding, rows_of)

    return {key: array(key) for key in keys}, count


def state_document(shards: int, states: dict[str, dict]) -> dict:
    return {"shards": shards, "states": states}


def parse_state(doc) -> tuple[int, dict]:
    """(shards, {shard: iterator state}) of a data state document (`state_document`), as a checkpoint keeps it."""
    try:
        return int(doc["shards"]), dict(doc["states"])
    except (KeyError, TypeError, ValueError):
        raise DataError("the data state holds no shard count and iterator states") from None
