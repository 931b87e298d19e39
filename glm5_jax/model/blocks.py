"""A loop over blocks of the sequence axis that keeps context shards on their devices.

Attention runs one block of queries at a time, and the losses one block of tokens at a time, so that no
[length, length] or [length, vocab] array exists. `map_blocks` is that loop; with `remat` each block is
rematerialised: the backward pass recomputes a block's insides from its inputs instead of keeping them,
so what the loop keeps for the backward is its inputs and outputs, whatever the block computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm5_jax.sharding.context import axis_size, constrain


def map_blocks(fn, block: int, *arrays, remat: bool = False):
    """Apply fn to blocks of `block` positions of each array [B, L, ...] (axis 1), concatenating results.

    Under context parallelism the sequence axis is split into its `length` shards first and every shard is
    cut into blocks of its own, so each loop iteration works on one block of every shard at once and no
    position leaves its device. Each shard is padded at its end to a whole number of blocks; the padding is
    cut off the results (fn sees it: zeros, or whatever the arrays are padded with).
    """
    n, shards = arrays[0].shape[1], axis_size("length")
    if n % shards:  # (a layout `layout_check.check_layout` accepted never gets here)
        raise ValueError(f"map_blocks: sequence length {n} does not split into {shards} equal context shards")
    local = n // shards
    block = min(block, local)
    n_blocks = -(-local // block)

    def split(a):  # [B, L, ...] -> [blocks, B, shards * block, ...]
        a = a.reshape(a.shape[0], shards, local, *a.shape[2:])
        a = jnp.pad(a, [(0, 0), (0, 0), (0, n_blocks * block - local)] + [(0, 0)] * (a.ndim - 3))
        a = a.reshape(a.shape[0], shards, n_blocks, block, *a.shape[3:])
        a = jnp.moveaxis(a, 2, 0).reshape(n_blocks, a.shape[0], shards * block, *a.shape[4:])
        return constrain(a, (None, "batch", "length") + (None,) * (a.ndim - 3))

    body = lambda blocks: fn(*blocks)
    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    out = jax.lax.map(body, tuple(split(a) for a in arrays))

    def join(o):  # [blocks, B, shards * block, ...] -> [B, L, ...]
        o = o.reshape(n_blocks, o.shape[1], shards, block, *o.shape[3:])
        o = jnp.moveaxis(o, 0, 2).reshape(o.shape[1], shards, n_blocks * block, *o.shape[4:])
        return constrain(o[:, :, :local].reshape(o.shape[0], n, *o.shape[3:]),
                         ("batch", "length") + (None,) * (o.ndim - 3))

    return jax.tree.map(join, out)
