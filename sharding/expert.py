"""Expert parallelism: MoE dispatch inside `shard_map` over the mesh axes that the `experts` axis maps to.

Each device routes its own tokens, sends every (token, expert) copy to the shard that owns the expert,
runs its local experts as one grouped matmul, sends the results back and combines them. Two exchanges:

- "capacity": fixed-size buffers of `capacity` rows per (source, destination) pair moved with
  `all_to_all`; runs on every backend (XLA:CPU included). Dropless by default (capacity = every local
  copy); with `capacity_factor` the buffer is `factor` times an even share and overflowing copies drop.
- "ragged": exactly the routed rows, moved with `ragged_all_to_all` (GPU/TPU; XLA:CPU lacks the op).
  The receive buffer holds the worst case (dropless) or `capacity_factor` times an even share.

Inside the map every mesh axis is manual: expert weights are gathered over the axes that shard their
`embed` dimension (FSDP) and the partial sums over their `expert_mlp` shards (tensor) are reduced, so
the layout rules decide everything and the model code stays logical.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glm5_jax.sharding.context import Parallelism


class Axes(NamedTuple):
    tokens: tuple[str, ...]  # mesh axes sharding the flattened token dimension (batch, then length)
    experts: tuple[str, ...]  # expert-parallel axes
    embed: tuple[str, ...]  # axes sharding the weights' model dimension (gathered inside)
    mlp: tuple[str, ...]  # axes sharding the expert hidden dimension (partial sums reduced inside)


def _axes(par: Parallelism, weight_shape) -> Axes:
    tokens = par.mesh_axes("batch") + par.mesh_axes("length")
    spec = par.spec(("experts", "embed", "expert_mlp"), weight_shape)
    spec = tuple(spec) + (None,) * (3 - len(spec))
    as_tuple = lambda s: () if s is None else (s,) if isinstance(s, str) else tuple(s)
    return Axes(tokens, *(as_tuple(s) for s in spec))


def dispatch_kind(setting: str, platform: str) -> str:
    """The exchange for the layout's `expert_dispatch` setting on devices of `platform`: `auto` is capacity
    on CPU (XLA:CPU lacks ragged_all_to_all), ragged elsewhere. Pure (no JAX): the FLOP count asks it too."""
    if setting == "auto":
        return "capacity" if platform == "cpu" else "ragged"
    return setting


def dispatch_mode(par: Parallelism) -> str:
    return dispatch_kind(par.config.expert_dispatch, par.platform)


def capacity_rows(copies: int, n_shards: int, factor: float | None) -> int:
    """Rows per (source, destination) buffer of the capacity exchange: every local copy (dropless), or
    `factor` times an even share."""
    return copies if factor is None else max(1, math.ceil(factor * copies / n_shards))


def ragged_buffer(copies: int, n_shards: int, factor: float | None) -> int:
    """Receive-buffer rows of the ragged exchange: the worst case (dropless) or `factor` times an even share."""
    return copies * n_shards if factor is None else max(1, math.ceil(factor * copies))


def received_rows(mode: str, copies: int, n_shards: int, factor: float | None) -> int:
    """Rows one device runs through its local experts when each of `n_shards` devices routes `copies`
    (token, expert) copies: the whole receive buffer, filled or not."""
    return n_shards * capacity_rows(copies, n_shards, factor) if mode == "capacity" else \
        ragged_buffer(copies, n_shards, factor)


def expert_parallel_ffn(x, idx, weights, gate, up, down, *, par: Parallelism, experts):
    """Routed expert output [T, D] and tokens processed per expert [E] on the devices of layout `par`: the
    experts sharded over its expert axes (tokens exchanged), or, with none, every device running its own
    tokens through all experts (no exchange; left to GSPMD, the token sort would keep the whole batch on
    every device).

    x [T, D] (T = batch * length, token-major), idx / weights [T, k] from the router, gate / up [E, D, F],
    down [E, F, D]. experts(rows, idx, weights, gate, up, down, n_experts) -> (output, load): the grouped
    matmul of one device's local experts (the model's `grouped_experts`). The ragged exchange is
    `par.ragged_exchange`.
    """
    axes = _axes(par, gate.shape)
    mode = dispatch_mode(par)
    n_shards = math.prod(par.mesh.shape[a] for a in axes.experts)
    n_experts = gate.shape[0]
    t_spec, w_in, w_out = P(axes.tokens or None), P(axes.experts or None, axes.embed or None, axes.mlp or None), \
        P(axes.experts or None, axes.mlp or None, axes.embed or None)
    factor = par.config.capacity_factor
    local = (_own_tokens if n_shards == 1 else _capacity_local if mode == "capacity" else
             functools.partial(_ragged_local, exchange=par.ragged_exchange))

    def body(x, idx, weights, gate, up, down):
        if axes.embed:  # FSDP: the weights' model dimension is gathered for the local matmuls
            gate, up = (jax.lax.all_gather(w, axes.embed, axis=1, tiled=True) for w in (gate, up))
            down = jax.lax.all_gather(down, axes.embed, axis=2, tiled=True)
        y, load = local(x, idx, weights, gate, up, down, axes=axes, n_shards=n_shards, n_experts=n_experts,
                        factor=factor, experts=experts)
        if axes.mlp:  # each shard computed a slice of the hidden units: sum the partial outputs
            y = jax.lax.psum(y, axes.mlp)
        return y, jax.lax.psum(load, axes.tokens) if axes.tokens else load

    fn = jax.shard_map(body, mesh=par.mesh, in_specs=(t_spec, t_spec, t_spec, w_in, w_in, w_out),
                       out_specs=(t_spec, P()))
    return fn(x, idx, weights, gate, up, down)


def _own_tokens(x, idx, weights, gate, up, down, *, n_experts, experts, **_):
    """No expert axis: this device's tokens through all experts, nothing exchanged."""
    return experts(x, idx, weights, gate, up, down, n_experts)


def _local_experts(rows, expert_ids, gate, up, down, experts):
    """Run rows [N, D] through local expert `expert_ids` [N]; id == number of local experts marks an empty
    slot, which `experts` counts in no group (its output is 0)."""
    valid = (expert_ids < gate.shape[0]).astype(rows.dtype)
    y, _ = experts(rows, expert_ids[:, None], valid[:, None], gate, up, down, gate.shape[0])
    return y


def _capacity_local(x, idx, weights, gate, up, down, *, axes, n_shards, n_experts, factor, experts):
    t, k = idx.shape
    n_local = n_experts // n_shards
    copies = t * k
    capacity = capacity_rows(copies, n_shards, factor)
    flat = idx.reshape(-1)
    dest = flat // n_local
    # Slot of each copy in its destination's buffer: its rank among the copies going there.
    order = jnp.argsort(dest, stable=True)
    counts = jnp.bincount(dest, length=n_shards)
    rank = jnp.empty_like(order).at[order].set(jnp.arange(copies) - (jnp.cumsum(counts) - counts)[dest[order]])
    kept = rank < capacity
    slot = jnp.where(kept, rank, capacity)  # `capacity` is out of range: dropped by mode="drop"

    send = jnp.zeros((n_shards, capacity, x.shape[1]), x.dtype).at[dest, slot].set(x[jnp.arange(copies) // k],
                                                                                  mode="drop")
    send_ids = jnp.full((n_shards, capacity), n_local, jnp.int32).at[dest, slot].set(flat % n_local, mode="drop")
    recv = jax.lax.all_to_all(send, axes.experts, 0, 0)
    recv_ids = jax.lax.all_to_all(send_ids, axes.experts, 0, 0)
    y = _local_experts(recv.reshape(-1, x.shape[1]), recv_ids.reshape(-1), gate, up, down, experts)
    back = jax.lax.all_to_all(y.reshape(n_shards, capacity, -1), axes.experts, 0, 0)
    out = back.at[dest, slot].get(mode="fill", fill_value=0)  # [copies, D]; dropped copies read 0
    out = (out * weights.reshape(-1, 1).astype(out.dtype)).reshape(t, k, -1).sum(1)
    load = jnp.bincount(jnp.where(kept, flat, n_experts), length=n_experts + 1)[:n_experts]
    return out, load.astype(jnp.int32)


def _ragged_local(x, idx, weights, gate, up, down, *, axes, n_shards, n_experts, factor, experts, exchange):
    t, k = idx.shape
    n_local = n_experts // n_shards
    copies = t * k
    buffer = ragged_buffer(copies, n_shards, factor)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by expert, hence by destination shard
    rows = x[order // k]
    sizes = jnp.bincount(flat // n_local, length=n_shards).astype(jnp.int32)  # [dest]
    in_offsets = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
    me = jax.lax.axis_index(axes.experts)
    matrix = jax.lax.all_gather(sizes, axes.experts)  # [source, dest]
    # Receivers take sources in order; with a bounded buffer the tail of each overflowing chunk drops.
    start = jnp.cumsum(matrix, axis=0) - matrix  # offset of each source's rows at each destination
    sent = jnp.clip(buffer - start, 0, matrix).astype(jnp.int32)
    out_offsets = start[me].astype(jnp.int32)
    recv_sizes = sent[:, me]
    recv_offsets = start[:, me].astype(jnp.int32)

    recv = exchange(rows, jnp.zeros((buffer, x.shape[1]), x.dtype), in_offsets, sent[me], out_offsets, recv_sizes,
                    axis_name=axes.experts)
    local_ids = (flat[order] % n_local).astype(jnp.int32)
    recv_ids = exchange(local_ids, jnp.full((buffer,), n_local, jnp.int32), in_offsets, sent[me], out_offsets,
                        recv_sizes, axis_name=axes.experts)
    y = _local_experts(recv, recv_ids, gate, up, down, experts)
    # Return trip: each destination sends the rows it got from a source back to where they came from.
    back_offsets = (jnp.cumsum(matrix, axis=1) - matrix)[:, me].astype(jnp.int32)  # source's in_offsets for me
    back = exchange(y, jnp.zeros((copies, y.shape[1]), y.dtype), recv_offsets, recv_sizes, back_offsets,
                    sent[me], axis_name=axes.experts)
    # Rows past what each destination accepted were never sent: they stay 0 (dropped copies).
    dest = flat[order] // n_local
    position = jnp.arange(copies) - in_offsets[dest]
    kept_sorted = position < sent[me][dest]
    back = jnp.where(kept_sorted[:, None], back, 0)
    out = jnp.zeros_like(back).at[order].set(back)
    out = (out * weights.reshape(-1, 1).astype(out.dtype)).reshape(t, k, -1).sum(1)
    kept = jnp.zeros((copies,), bool).at[order].set(kept_sorted)
    load = jnp.bincount(jnp.where(kept, flat, n_experts), length=n_experts + 1)[:n_experts]
    return out, load.astype(jnp.int32)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all` built from all_gather, for checking the ragged path where XLA lacks it.

    Same contract: this shard's rows operand[input_offsets[j] : + send_sizes[j]] land in shard j's output
    at output_offsets[j]; rows of output nobody writes keep their values. Moves every shard's whole
    operand to every shard, so it is for tests only.
    """
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [S, N, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)  # [S(source), S(dest)]
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    out_off = jax.lax.all_gather(output_offsets, axis_name)
    rows = jnp.arange(output.shape[0])
    for source in range(ops.shape[0]):
        start, size, src = out_off[source, me], sizes[source, me], in_off[source, me]
        take = (rows >= start) & (rows < start + size)
        picked = jnp.take(ops[source], jnp.clip(src + rows - start, 0, ops.shape[1] - 1), axis=0)
        output = jnp.where(take.reshape((-1,) + (1,) * (output.ndim - 1)), picked, output)
    return output
