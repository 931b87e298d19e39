"""The decode cache: per layer and token only what MLA and DSA read back.

MLA keeps its latent (c_kv | k_rope: kv_lora_rank + qk_rope_head_dim numbers, 576 for GLM-5) and DSA its
indexer key (index_head_dim, 128); the per-head K and V are never stored. A layer without an indexer
(IndexShare "shared") keeps no indexer key. Arrays are stacked like the model's layer groups, so a decode
step scans a group's parameters and its cache together. Slot s of a row holds position s; the length T is
fixed when the cache is made, so every decode step has one shape and compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from glm5_jax.model.transformer import layer_groups


class LayerCache(NamedTuple):
    """One layer group's (or the MTP depths') cache."""

    latent: jax.Array  # [layers, B, T, kv_lora_rank + qk_rope_head_dim], model dtype
    index_keys: jax.Array | None  # [layers, B, T, index_head_dim], model dtype; None for "shared" layers


class DecodeCache(NamedTuple):
    groups: tuple[LayerCache, ...]  # one per layer_groups(cfg) entry
    mtp: LayerCache | None  # [mtp_depths, ...]: each MTP depth attends over its own sequence

    @property
    def length(self) -> int:
        return self.groups[0].latent.shape[2]


def latent_width(cfg) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def cache_bytes_per_token(cfg, indexer: bool = True) -> int:
    """Bytes one layer keeps per token: latent and indexer key, both in the model dtype (the indexer
    computes its key in the model dtype and only then casts it to float32 for scoring, so this is lossless)."""
    return (latent_width(cfg) + (cfg.index_head_dim if indexer else 0)) * jnp.dtype(cfg.dtype).itemsize


def _layer_cache(cfg, layers: int, indexer: bool, batch: int, length: int, entries=None) -> LayerCache:
    """A zero cache, or one holding `entries` (latent, keys) [layers, B, L <= length, .] in slots 0..L-1."""
    latent = jnp.zeros((layers, batch, length, latent_width(cfg)), jnp.dtype(cfg.dtype))
    keys = jnp.zeros((layers, batch, length, cfg.index_head_dim), jnp.dtype(cfg.dtype)) if indexer else None
    if entries is not None:
        lat, k = entries
        latent = jax.lax.dynamic_update_slice(latent, lat.astype(latent.dtype), (0, 0, 0, 0))
        if keys is not None:
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, 0, 0, 0))
    return LayerCache(latent, keys)


def empty(cfg, batch: int, length: int, with_mtp: bool) -> DecodeCache:
    groups = tuple(_layer_cache(cfg, g.count, g.indexer, batch, length) for g in layer_groups(cfg))
    mtp = _layer_cache(cfg, cfg.mtp_depths, True, batch, length) if with_mtp else None
    return DecodeCache(groups, mtp)


def from_entries(cfg, group_entries, mtp_entries, batch: int, length: int) -> DecodeCache:
    """A cache of `length` slots holding the prefill's entries (one (latent, keys) per group, stacked)."""
    groups = tuple(_layer_cache(cfg, g.count, g.indexer, batch, length, e)
                   for g, e in zip(layer_groups(cfg), group_entries))
    mtp = None if mtp_entries is None else _layer_cache(cfg, cfg.mtp_depths, True, batch, length, mtp_entries)
    return DecodeCache(groups, mtp)


def per_token_per_layer(cache: DecodeCache) -> list[int]:
    """Bytes per token of every main-stack layer, read off the cache's array shapes and dtypes."""
    out = []
    for g in cache.groups:
        n = g.latent.shape[-1] * np.dtype(g.latent.dtype).itemsize
        if g.index_keys is not None:
            n += g.index_keys.shape[-1] * np.dtype(g.index_keys.dtype).itemsize
        out += [n] * g.latent.shape[0]
    return out
