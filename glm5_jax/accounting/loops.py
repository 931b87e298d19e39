"""Trip counts of the train step's loops whose count XLA cannot know at compile time.

Three loops of the step run a count that depends on runtime values, so the compiled HLO carries no
`known_trip_count` for them (glm5_jax/accounting/compiled.py counts them by what this module says). Each is
built inside its own `glm5_jax.scopes` name, which is how the compiled loop is recognised:

- `scopes.ACCUMULATE`, the accumulation loop (`glm5_jax/train/step.py`: `fori_loop(0, count)` over the step's
  microbatches, `count` an argument): it runs `count` times, the microbatches the benchmarked steps use;
- `scopes.TOPK_MERGE`, the top-k merge loop of DSA's key selection (`glm5_jax/model/dsa.py`:
  `fori_loop(1, needed)` over the key chunks up to a query block's last position, since later chunks hold
  keys none of its queries can see): `needed - 1` trips, which this module computes for every query block of
  every sequence shard from the step's shapes, exactly as the model computes `needed` (its query positions
  are the row positions 0..L-1 of the sequence, whatever the packing). The mean over blocks and shards is the
  per-execution count (every device runs the same program on its own shard).
- `scopes.FLASH_KEYS`, `dsa: dense`'s loop over the key blocks of one query block (`glm5_jax/model/flash.py`:
  `fori_loop` from the block holding the earliest document start of its queries to the one holding its last
  query), forward and backward: counted for one document a row, the most a row computes (packed documents
  skip the blocks before their starts), as the analytic count (`analytic.dense_pairs`) counts it.
"""

from __future__ import annotations

from glm5_jax import scopes
from glm5_jax.accounting.analytic import dense_pairs, scored_chunks


def topk_merge_trips(seq_len: int, topk: int, block: int, context: int = 1) -> float:
    """Mean trips of the top-k merge loop per query block, over the blocks of all `context` shards: every chunk
    the block scores but the first (`analytic.scored_chunks`)."""
    return scored_chunks(seq_len, topk, block, context) - 1


def flash_key_trips(seq_len: int, block: int, context: int = 1) -> float:
    """Mean trips of the dense key-block loop per query block, over the blocks of all `context` shards (one
    document a row)."""
    local = seq_len // context
    block = min(block, local)
    return dense_pairs(seq_len, context, block) / (block * block * context * -(-local // block))


def step_trips(spec, context: int, count: int):
    """`dynamic_trips(scope)` for the step of `spec` (train.step.StepConfig) with `context` sequence shards,
    run on batches of `count` microbatches: the three loops above, None for any other."""
    cfg = spec.model_cfg

    def trips(scope: str | None):
        if scope == scopes.ACCUMULATE:
            return float(count)
        if scope == scopes.TOPK_MERGE:
            return topk_merge_trips(spec.seq_len, cfg.index_topk, cfg.attention_query_block, context)
        if scope == scopes.FLASH_KEYS:
            return flash_key_trips(spec.seq_len, cfg.attention_query_block, context)
        return None

    return trips
