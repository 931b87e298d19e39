"""Prefill and decode steps of the main model and of the MTP layer over a DecodeCache.

Prefill runs the training forward over the (right-padded) prompts and keeps each layer's cache entries;
a decode step runs new tokens of every row at that row's own positions through the layers' `decode`
methods (absorbed MLA over the cached latents, DSA top-k over the cached indexer keys). Both are pure
functions of the model and arrays, meant to be jitted once per shape by the runner.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax.generate import cache as cache_lib
from glm5_jax.model.transformer import HIDDEN
from glm5_jax.sharding.context import constrain


def _scan(stack, fn, carry, *xs):
    """lax.scan of fn(layer, carry, *x) over a stacked layer group and per-layer arrays `xs`."""
    graphdef, state = nnx.split(stack)

    def body(carry, x):
        return fn(nnx.merge(graphdef, x[0]), carry, *x[1:])

    return jax.lax.scan(body, carry, (state, *xs))


def prefill(model, ids, lengths, cache_length: int):
    """Run prompts ids [B, P] (row b real up to lengths[b], padding after) and fill a cache of
    `cache_length` slots. -> (logits [B, P, V] float32, final-normed hidden [B, P, D], DecodeCache of the
    main stack; its mtp part is None)."""
    cfg = model.cfg
    B, P = ids.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # padding: its own segment 0
    cos, sin = model.rope(positions)
    h = constrain(model.embed(ids), HIDDEN)
    topk_idx = jnp.zeros((B, P, cfg.index_topk), jnp.int32) if cfg.index_topk < P else None

    def layer_fn(layer, carry):
        h, topk_idx = carry
        h, topk_idx, _, entries = layer.forward(h, cos, sin, segment_ids, topk_idx, with_cache=True)
        return (h, topk_idx), entries

    entries = []
    for stack in model.layers:
        (h, topk_idx), e = _scan(stack, layer_fn, (h, topk_idx))
        entries.append(e)
    h = model.norm(h)
    cache = cache_lib.from_entries(cfg, entries, None, B, cache_length)
    return model.head(h), h, cache


def decode(model, cache: cache_lib.DecodeCache, ids, positions):
    """New tokens ids [B, Q] at `positions` [B, Q] through the main stack over `cache`.

    -> (logits [B, Q, V] float32, final-normed hidden [B, Q, D], the cache with these tokens written)."""
    cfg = model.cfg
    B, Q = ids.shape
    cos, sin = model.rope(positions)
    h = constrain(model.embed(ids), HIDDEN)
    topk_idx = jnp.zeros((B, Q, cfg.index_topk), jnp.int32) if cache.length > cfg.index_topk else None

    def layer_fn(layer, carry, latent, keys):
        h, topk_idx = carry
        h, topk_idx, latent, keys = layer.decode(h, cos, sin, positions, latent, keys, topk_idx)
        return (h, topk_idx), (latent, keys)

    groups = []
    for stack, g in zip(model.layers, cache.groups):
        (h, topk_idx), (latent, keys) = _scan(stack, layer_fn, (h, topk_idx), g.latent, g.index_keys)
        groups.append(cache_lib.LayerCache(latent, keys))
    h = model.norm(h)
    return model.head(h), h, cache._replace(groups=tuple(groups))


def mtp_prefill(model, ids, lengths, hidden, cache: cache_lib.DecodeCache):
    """Fill the MTP depths' caches over the prompts, as training runs them: depth k at position t reads
    token t + k and depth k - 1's hidden state at t (the main model's final-normed one for k = 1).
    Positions whose token t + k lies past the prompt get segment 0 here and are rewritten by the drafts.
    -> the cache with its mtp part."""
    cfg = model.cfg
    B, P = ids.shape
    D = cfg.mtp_depths
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    cos, sin = model.rope(positions)
    padded = jnp.pad(ids, ((0, 0), (0, D)))
    depth_ids = jnp.stack([padded[:, k:k + P] for k in range(1, D + 1)])
    depth_segments = jnp.stack([(positions + k < lengths[:, None]).astype(jnp.int32) for k in range(1, D + 1)])
    graphdef, state = nnx.split(model.mtp)

    def depth(h, x):
        ids_k, seg_k = x
        h, _, _, entries = nnx.merge(graphdef, state).step(h, model.embed(ids_k), cos, sin, seg_k,
                                                           with_cache=True)
        return h, entries

    _, entries = jax.lax.scan(depth, hidden, (depth_ids, depth_segments))
    full = cache_lib.from_entries(cfg, [], entries, B, cache.length)
    return cache._replace(mtp=full.mtp)


def mtp_decode(model, cache: cache_lib.DecodeCache, depth: int, h_prev, ids, positions):
    """MTP depth `depth` (0-based index into the depth caches; may be traced) on new positions.

    -> (h [B, Q, D], logits [B, Q, V], the cache with this depth's entries written)."""
    mtp = cache.mtp
    cos, sin = model.rope(positions)
    latent, keys = mtp.latent[depth], mtp.index_keys[depth]
    h, normed, latent, keys = model.mtp.decode(h_prev, model.embed(ids), cos, sin, positions, latent, keys)
    mtp = cache_lib.LayerCache(mtp.latent.at[depth].set(latent), mtp.index_keys.at[depth].set(keys))
    return h, model.head(normed), cache._replace(mtp=mtp)
