"""The DeepSeek Sparse Attention lightning indexer and its top-k key selection.

I[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . k_I[s] / sqrt(d_I)); query t attends only to the `index_topk`
visible keys with the highest I[t, s]. Scores are computed per block of queries so memory is
O(block * length), never [length, length] at once.

Training the indexer (docs/losses.md): `indexer_kl` is KL(p || softmax(I)) of one query block, with p the
main attention's probabilities summed over heads (a stop-gradient target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax.config import ConfigError
from glm5_jax.model.norms import LayerNorm
from glm5_jax.model.params import make_param
from glm5_jax.model.rope import apply_rope
from glm5_jax.sharding.context import axis_size, constrain


class Indexer(nnx.Module):
    def __init__(self, cfg, *, stack: int | None, rngs: nnx.Rngs):
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.relu = cfg.qk_rope_head_dim, cfg.indexer_relu
        self.dtype = jnp.dtype(cfg.dtype)
        self.wq_b = make_param(rngs, (cfg.q_lora_rank, self.n_heads, self.head_dim),
                               ("q_lora", "index_heads", "index_head_dim"), stack=stack, dtype=pd, std=std)
        self.wk = make_param(rngs, (cfg.hidden_size, self.head_dim), ("embed", "index_head_dim"),
                             stack=stack, dtype=pd, std=std)
        self.k_norm = LayerNorm(self.head_dim, 1e-6, axis="index_head_dim", stack=stack, param_dtype=pd)
        # transformers keeps weights_proj in float32 whatever the model dtype; so do we.
        self.weights_proj = make_param(rngs, (cfg.hidden_size, self.n_heads), ("embed", "index_heads"),
                                       stack=stack, dtype=jnp.float32, std=std)

    def project(self, x, c_q, cos, sin):
        """Indexer queries [B, L, Hi, Di], keys [B, L, Di] (float32) and head weights [B, L, Hi]."""
        q = jnp.einsum("blr,rhd->blhd", c_q, self.wq_b[...].astype(self.dtype))
        k = self.k_norm(x @ self.wk[...].astype(self.dtype))
        r = self.rope_dim
        q = jnp.concatenate([apply_rope(q[..., :r], cos, sin), q[..., r:]], axis=-1)
        k = jnp.concatenate([apply_rope(k[..., :r], cos, sin), k[..., r:]], axis=-1)
        w = (x.astype(jnp.float32) @ self.weights_proj[...]) * self.n_heads ** -0.5
        return q.astype(jnp.float32), k.astype(jnp.float32), w

    def scores(self, q, k, w):
        """Index scores [B, Q, L] of query block q [B, Q, Hi, Di] against all keys k [B, L, Di]."""
        s = jnp.einsum("bqhd,bkd->bqhk", q, k) * self.head_dim ** -0.5
        if self.relu:
            s = jax.nn.relu(s)
        return jnp.einsum("bqh,bqhk->bqk", w, s)

    def scores_at(self, q, k_sel, w):
        """Index scores [B, Q, K] of query block q [B, Q, Hi, Di] against its own keys k_sel [B, Q, K, Di]."""
        s = jnp.einsum("bqhd,bqkd->bqhk", q, k_sel) * self.head_dim ** -0.5
        if self.relu:
            s = jax.nn.relu(s)
        return jnp.einsum("bqh,bqhk->bqk", w, s)


def indexer_kl(probs, index_scores, ok):
    """KL(p || softmax(I)) per query [B, Q] over the keys where `ok` [B, Q, K].

    probs [B, Q, H, K]: the main attention's probabilities (float32); their sum over heads, L1-normalised
    per query, is the target p and gets no gradient. index_scores [B, Q, K]: the indexer's I over the same
    keys; only they carry gradient. Masked keys have p = 0 and drop out of the softmax of I.
    """
    p = jax.lax.stop_gradient(jnp.where(ok, probs.astype(jnp.float32).sum(axis=2), 0.0))
    p = p / jnp.maximum(p.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    # The lowest finite float, not -inf, for masked keys: rows with no visible key stay finite.
    log_q = jax.nn.log_softmax(jnp.where(ok, index_scores, jnp.finfo(jnp.float32).min), axis=-1)
    positive = p > 0
    log_p = jnp.log(jnp.where(positive, p, 1.0))
    return jnp.sum(jnp.where(positive, p * (log_p - log_q), 0.0), axis=-1)


def visible(q_index, k_index, q_segment, k_segment):
    """Causal and same-document visibility of keys to queries (indices are row positions)."""
    return (k_index <= q_index) & (k_segment == q_segment)


def map_query_blocks(fn, block: int, *arrays):
    """Apply fn to blocks of `block` queries of each array [B, L, ...] (axis 1), concatenating results.

    Under context parallelism the query axis is split into its `length` shards first and every shard is
    cut into blocks of its own, so each loop iteration works on one block of every shard at once and no
    query leaves its device. Each shard is padded at its end to a whole number of blocks; the padding is
    cut off the results.
    """
    n, shards = arrays[0].shape[1], axis_size("length")
    if n % shards:
        raise ConfigError(f"mesh.context: sequence length {n} does not split into {shards} equal context shards")
    local = n // shards
    block = min(block, local)
    n_blocks = -(-local // block)

    def split(a):  # [B, L, ...] -> [blocks, B, shards * block, ...]
        a = a.reshape(a.shape[0], shards, local, *a.shape[2:])
        a = jnp.pad(a, [(0, 0), (0, 0), (0, n_blocks * block - local)] + [(0, 0)] * (a.ndim - 3))
        a = a.reshape(a.shape[0], shards, n_blocks, block, *a.shape[3:])
        a = jnp.moveaxis(a, 2, 0).reshape(n_blocks, a.shape[0], shards * block, *a.shape[4:])
        return constrain(a, (None, "batch", "length") + (None,) * (a.ndim - 3))

    out = jax.lax.map(lambda blocks: fn(*blocks), tuple(split(a) for a in arrays))

    def join(o):  # [blocks, B, shards * block, ...] -> [B, L, ...]
        o = o.reshape(n_blocks, o.shape[1], shards, block, *o.shape[3:])
        o = jnp.moveaxis(o, 0, 2).reshape(o.shape[1], shards, n_blocks * block, *o.shape[4:])
        return constrain(o[:, :, :local].reshape(o.shape[0], n, *o.shape[3:]),
                         ("batch", "length") + (None,) * (o.ndim - 3))

    return jax.tree.map(join, out)


def select_topk(indexer: Indexer, q, k, w, segment_ids, topk: int, block: int):
    """Top-k key indices [B, L, topk] (int32) per query; invisible keys rank last (score -inf)."""
    # Every query scores every key, so under context parallelism the keys are gathered whole (128 numbers
    # a token) while the queries stay in their shard.
    k = constrain(k, ("batch", None, None))
    key_segments = constrain(segment_ids, ("batch", None))
    length = k.shape[1]
    k_index = jnp.arange(length)

    def block_topk(qb, wb, q_index, q_segment):
        s = indexer.scores(qb, k, wb)
        ok = visible(q_index[..., None], k_index, q_segment[..., None], key_segments[:, None, :])
        s = jnp.where(ok, s, -jnp.inf)
        return jax.lax.top_k(s, topk)[1].astype(jnp.int32)

    q_index = jnp.broadcast_to(k_index, segment_ids.shape)
    return map_query_blocks(block_topk, block, q, w, q_index, segment_ids)
