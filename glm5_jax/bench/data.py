"""The data part: how fast the stage's data pipeline delivers batches, with no step running.

A fresh data feed (the trainer's `Feed` over the run's `DataPipeline`, from the stage's first step) is read
as fast as it goes: each batch as the trainer's loop takes it (`Feed.next_batch`: read, packed, placed on
the devices as the step's global arrays, waited for). The first batch, which opens the stage's Grain
pipeline and fills its buffers, is timed apart; the rate is over the batches after it.
"""

from __future__ import annotations

import time

import jax


def measure(bench, open_feed, batches: int, out) -> dict:
    """{first_batch_s, batches, seconds, tokens_per_s} of `batches` + 1 batches read from a fresh feed."""
    stage = bench.stage
    out(f"reading {batches + 1} batches of stage {stage.name} from a fresh data feed (no step)")
    it = open_feed(None, None, 0)
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(it.next_batch(stage)[0])
        first = time.perf_counter() - t0
        tokens = 0
        t1 = time.perf_counter()
        for _ in range(batches):
            batch, count = it.next_batch(stage)
            jax.block_until_ready(batch)
            tokens += count * stage.data.micro_rows * stage.data.seq_len
        seconds = time.perf_counter() - t1
    finally:
        it.close()
    return {"first_batch_s": first, "batches": batches, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "what": "Feed.next_batch: read, pack, place on the devices"}
