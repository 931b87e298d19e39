"""Pipeline parallelism: one stacked layer group split into stages over the mesh axes of logical
`pipeline_stages`.

Placement (docs/parallelism.md, "Pipeline parallelism"): the model picks the group (its last MoE group) and
passes its stacked state with the function that runs consecutive layers of it. Of its n
layers the first n mod (stages * repeats) run before the pipeline, with the embedding and the other
groups, replicated on every pipeline rank; the rest split into stages * repeats equal chunks of
consecutive layers. Chunk c = r * stages + s (model order) lives on stage s as its repeat r, which is a
plain reshape of the stacked weights [n, ...] -> [repeats, stages, per_chunk, ...].

Schedule: the batch is cut into M microbatches (row m, m + M, ... form microbatch m, so each keeps the
data-parallel sharding of the batch). All stages run at once under `jax.vmap` over the stage axis
(sharded over the stage mesh axes; `spmd_axis_name` makes shardings and shard_maps inside batch per
stage). Iteration t runs (microbatch m, repeat r) on stage s where t - s = r * M + m, for
t in [0, M * repeats + stages - 1); stage outputs move to the next stage with a ring `ppermute` in a
`shard_map` over the stage axes. Stage 0 reads microbatches from a per-stage store [M, ...] that starts as
the pipeline input; the last stage's outputs reach stage 0 over the ring's wrap-around link and are
written back into the store, where stage 0 picks them up for the next repeat (M >= stages guarantees they
arrive in time) and where the final outputs are left. Iterations outside a stage's valid range compute
on zeros or stale rows; their results are never stored, so they reach neither the loss, the gradients
nor the expert loads (masked). RoPE tables, segment ids and shared top-k indices are per microbatch and
indexed by each stage's microbatch number, never shifted.

Memory: each iteration's stage compute is rematerialised (`jax.checkpoint`); what a scan iteration keeps
for the backward pass is its stage inputs (one microbatch per stage). The store and the ring buffer are
carried outside the checkpoint and are only read and written at a dynamic index, so they are not saved
per iteration.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from glm5_jax import scopes
from glm5_jax.sharding.context import Parallelism, constrain, current


class Chunks(NamedTuple):
    """How the pipelined group's layers split over stages and repeats."""

    stages: int
    repeats: int
    microbatches: int
    before: int  # layers of the group that run before the pipeline (n mod stages * repeats)
    per_chunk: int  # layers in each of the stages * repeats chunks


def chunks(n_layers: int, par: Parallelism) -> Chunks:
    """The chunks of a pipelined group of `n_layers` layers under layout `par` (which
    `glm5_jax.model.layout_check.check_layout` has checked: n_layers >= stages x repeats, microbatches >=
    stages and dividing the batch)."""
    stages, repeats, micro = par.axis_size("pipeline_stages"), par.config.pipeline_repeats, par.config.microbatches
    return Chunks(stages, repeats, micro, n_layers % (stages * repeats), n_layers // (stages * repeats))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _map_variables(fn, state):
    """Apply fn(value, logical_axes) to every variable of an nnx State, keeping the variables' metadata."""
    return jax.tree.map(lambda v: v.replace(fn(v[...], v.get_metadata().get("logical_axes"))), state,
                        is_leaf=_is_variable)


def _microbatches(a, micro: int, axes):
    """[B, ...] -> [M, B / M, ...]: microbatch m is rows m, m + M, ...; the rows keep the batch sharding."""
    if a is None:
        return None
    a = a.reshape(a.shape[0] // micro, micro, *a.shape[1:]).swapaxes(0, 1)
    return constrain(a, (None,) + axes)


def _ring(x, par: Parallelism, axes):
    """Stage s's slice of x [stages, ...] moves to stage s + 1 (the last one's to stage 0): a ppermute."""
    n = par.axis_size("pipeline_stages")
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.shard_map(lambda a: jax.lax.ppermute(a, axes, perm), mesh=par.mesh, in_specs=P(axes),
                         out_specs=P(axes), axis_names=frozenset(axes))(x)


def _from_first_stage(x, par: Parallelism, axes):
    """x[0] of x [stages, ...] on every pipeline rank (stage 0's block, summed with zeros elsewhere)."""

    def first(a):
        return jax.lax.psum(jnp.where(jax.lax.axis_index(axes) == 0, a[0], jnp.zeros_like(a[0])), axes)

    return jax.shard_map(first, mesh=par.mesh, in_specs=P(axes), out_specs=P(), axis_names=frozenset(axes))(x)


def run_pipelined(stage, state, h, cos, sin, segment_ids, topk_idx):
    """Run a stacked layer group as a pipeline over the active layout's stages.

    stage(state, h, cos, sin, segment_ids, topk_idx) -> (h, topk_idx, stats) runs consecutive layers of the
    stacked `state` (an nnx State whose variables lead with the layer axis; stats: a pytree of per-layer
    arrays [layers, ...], each a sum over batch rows, so microbatch results add up). It runs the remainder
    layers before the pipeline and each chunk inside it. Layers that read an incoming top-k get it per
    microbatch; the top-k returned is the incoming one (the model pipelines a group no later layer reads
    the top-k of). Same results as `stage(state, ...)` on one device.
    """
    par = current()
    p = chunks(jax.tree.leaves(state)[0].shape[0], par)
    body = jax.tree.map(lambda a: a[p.before:], state)
    if p.before:
        head = jax.tree.map(lambda a: a[:p.before], state)
        h, topk_idx, head_stats = stage(head, h, cos, sin, segment_ids, topk_idx)
    h, stats = _pipeline(stage, body, h, (cos, sin, segment_ids, topk_idx), p, par)
    if p.before:
        stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head_stats, stats)
    return h, topk_idx, stats


def _pipeline(run_chunk, state, h, per_row, p: Chunks, par: Parallelism):
    S, R, M, per_chunk = p.stages, p.repeats, p.microbatches, p.per_chunk
    axes = par.mesh_axes("pipeline_stages")

    def stage_view(a, logical):  # [R * S * per_chunk, ...] -> [S, R, per_chunk, ...], stage axis sharded
        a = a.reshape(R, S, per_chunk, *a.shape[1:]).swapaxes(0, 1)
        rest = tuple(logical[1:]) if logical else (None,) * (a.ndim - 3)
        return constrain(a, ("pipeline_stages", None, "layers") + rest)

    weights = _map_variables(stage_view, state)
    cos, sin, segment_ids, topk_idx = per_row
    per_mb = (_microbatches(cos, M, ("batch", "length", None)), _microbatches(sin, M, ("batch", "length", None)),
              _microbatches(segment_ids, M, ("batch", "length")), _microbatches(topk_idx, M, ("batch", "length", None)))

    def stage(w, x, r, m, valid, per_mb):
        """One stage's work in one iteration: repeat r's chunk of layers on microbatch m."""
        chunk = jax.tree.map(lambda a: a[r], w)
        cos, sin, seg, topk = jax.tree.map(lambda a: a[m], per_mb)
        x, _, stats = run_chunk(chunk, x, cos, sin, seg, topk)
        return x, jax.tree.map(lambda a: jnp.where(valid, a, jnp.zeros_like(a)), stats)  # fill/drain: no stats

    compute = jax.checkpoint(jax.vmap(stage, in_axes=(0, 0, 0, 0, 0, None), spmd_axis_name=axes),
                             policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    stage_ids = jnp.arange(S)
    hidden = ("pipeline_stages", "batch", "length", "act_embed")

    def iteration(carry, t):
        store, shifted = carry
        k = t - stage_ids  # stage s works on microbatch k % M of repeat k // M
        valid = (k >= 0) & (k < M * R)
        k = jnp.clip(k, 0, M * R - 1)
        first = jax.lax.dynamic_index_in_dim(store, t % M, axis=1, keepdims=False)
        x = constrain(jnp.where((stage_ids == 0)[:, None, None, None], first, shifted), hidden)
        out, stats = compute(weights, x, k // M, k % M, valid, per_mb)
        received = constrain(_ring(out, par, axes), hidden)
        # Stage 0 now holds the last stage's output of this iteration: microbatch done = t - (S - 1).
        done = t - (S - 1)
        slot = jnp.maximum(done, 0) % M
        kept = jax.lax.dynamic_index_in_dim(store, slot, axis=1, keepdims=False)
        store = jax.lax.dynamic_update_index_in_dim(store, jnp.where(done >= 0, received, kept), slot, axis=1)
        return (store, received), stats

    x = _microbatches(h, M, ("batch", "length", "act_embed"))
    store = constrain(jnp.broadcast_to(x, (S,) + x.shape), ("pipeline_stages", None) + hidden[1:])
    shifted = constrain(jnp.zeros((S,) + x.shape[1:], x.dtype), hidden)
    steps = M * R + S - 1
    with jax.named_scope(scopes.PIPELINE):
        (store, _), stats = jax.lax.scan(iteration, (store, shifted), jnp.arange(steps))  # stats [steps, S, ...]
    out = _from_first_stage(store, par, axes)  # [M, B / M, L, D]
    h = constrain(out.swapaxes(0, 1).reshape(h.shape), ("batch", "length", "act_embed"))
    # Sum each stage's per-iteration stats (zero outside its valid iterations) into its repeats, then order
    # [S, R, per_chunk, ...] -> [layers, ...] as the model does: layer (r * S + s) * per_chunk + j.
    k = np.arange(steps)[:, None] - np.arange(S)[None]
    repeat = np.eye(R, dtype=np.int32)[np.clip(k, 0, M * R - 1) // M]  # [steps, S, R]
    stats = jax.tree.map(lambda a: jnp.sum(_expand(repeat, a.ndim + 1).astype(a.dtype) * a[:, :, None], axis=0),
                         stats)
    stats = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(R * S * per_chunk, *a.shape[3:]), stats)
    return h, stats


def _expand(a, ndim: int):
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))
