"""The DeepSeek Sparse Attention lightning indexer and its top-k key selection.

I[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . k_I[s] / sqrt(d_I)); query t attends only to the `index_topk`
visible keys with the highest I[t, s]. Scores are computed per block of queries against chunks of keys, so
memory is O(block * chunk), never [length, length] or [block, length] at once (`select_topk`).

Training the indexer (docs/losses.md): `indexer_kl` is KL(p || softmax(I)) of one query block, with p the
main attention's probabilities summed over heads (a stop-gradient target).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax import scopes
from glm5_jax.model.blocks import map_blocks
from glm5_jax.model.norms import LayerNorm
from glm5_jax.model.params import make_param
from glm5_jax.model.rope import apply_rope
from glm5_jax.sharding.context import per_shard


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
        """Indexer queries [B, L, Hi, Di], keys [B, L, Di] (the model dtype: stored, as large as x) and head
        weights [B, L, Hi] (float32)."""
        with jax.named_scope(scopes.INDEXER):
            k = self.k_norm(x @ self.wk[...].astype(self.dtype))
            r = self.rope_dim
            k = jnp.concatenate([apply_rope(k[..., :r], cos, sin), k[..., r:]], axis=-1)
            w = (x.astype(jnp.float32) @ self.weights_proj[...]) * self.n_heads ** -0.5
            return self.queries(c_q, cos, sin), k, w

    def queries(self, c_q, cos, sin):
        """Indexer queries [B, L, Hi, Di] of the attention's query latents c_q [B, L, q_lora_rank]."""
        q = jnp.einsum("blr,rhd->blhd", c_q, self.wq_b[...].astype(self.dtype))
        r = self.rope_dim
        return jnp.concatenate([apply_rope(q[..., :r], cos, sin), q[..., r:]], axis=-1)

    def scores(self, q, k, w):
        """Index scores [B, Q, L] of query block q [B, Q, Hi, Di] against all keys k [B, L, Di]."""
        s = jnp.einsum("bqhd,bkd->bqhk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        if self.relu:
            s = jax.nn.relu(s)
        return jnp.einsum("bqh,bqhk->bqk", w, s)

    def scores_at(self, q, k_sel, w):
        """Index scores [B, Q, K] of query block q [B, Q, Hi, Di] against its own keys k_sel [B, Q, K, Di]."""
        s = jnp.einsum("bqhd,bqkd->bqhk", q, k_sel, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
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


def select_topk(indexer: Indexer, q, k, w, segment_ids, topk: int, block: int):
    """Top-k key indices [B, L, topk] (int32) per query: its `topk` visible keys of highest index score.

    Exactly `lax.top_k` of each query's scores over all keys with invisible keys at -inf (ties go to the
    lower key index; a query with fewer than topk visible keys gets invisible ones, which attention masks),
    computed without its cost:
    - each device selects for its own queries (`per_shard`): under context parallelism a shard's scores
      never leave its device; only the indexer keys (index_head_dim numbers a token) are gathered;
    - queries go in blocks of `block`, keys in chunks of max(topk, block) merged into a running top-k, and
      a block scores only the chunks up to its last query's position (causal: half the indexer's FLOPs);
      the chunks a block skips hold keys its queries cannot see, which rank after every scanned key.
    The indices carry no gradient, so the inputs are detached.
    """
    q, k, w = (jax.lax.stop_gradient(a) for a in (q, k, w))
    positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), segment_ids.shape)
    fn = per_shard(functools.partial(_local_topk, indexer, topk=topk, block=block),
                   in_axes=(("batch", "length", None, None), ("batch", None, None), ("batch", "length", None),
                            ("batch", "length"), ("batch", "length"), ("batch", None)),
                   out_axes=("batch", "length", None))
    with jax.named_scope(scopes.INDEXER):
        return fn(q, k, w, positions, segment_ids, segment_ids)


def _local_topk(indexer: Indexer, q, k, w, q_pos, q_seg, k_seg, *, topk: int, block: int):
    """`select_topk` of queries q [B, Q, Hi, Di] at positions q_pos over all keys k [B, L, Di] on one device."""
    B, length = k_seg.shape
    chunk = max(topk, block)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length  # padded keys: segment -1, seen by no query
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0))).reshape(B, n_chunks, chunk, k.shape[-1])
    k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)), constant_values=-1).reshape(B, n_chunks, chunk)

    def block_topk(qb, wb, pos, seg):
        def scored(c):  # masked scores [B, Q, chunk] of key chunk c and the chunk's key indices
            k_index = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
            ok = visible(pos[..., None], k_index, seg[..., None], k_seg[:, c][:, None, :])
            return jnp.where(ok, indexer.scores(qb, k[:, c], wb), -jnp.inf), k_index

        def merge(c, best):  # the top-k of (best so far, chunk c): best first, so ties keep the lower index
            values, index = best
            s, k_index = scored(c)
            values, pick = jax.lax.top_k(jnp.concatenate([values, s], axis=-1), topk)
            index = jnp.concatenate([index, jnp.broadcast_to(k_index, s.shape)], axis=-1)
            return values, jnp.take_along_axis(index, pick, axis=-1)

        values, pick = jax.lax.top_k(scored(0)[0], topk)  # chunk 0 holds >= topk keys (length > topk)
        needed = jnp.minimum(jnp.max(pos) // chunk + 1, n_chunks)
        with jax.named_scope(scopes.TOPK_MERGE):
            return jax.lax.fori_loop(1, needed, merge, (values, pick.astype(jnp.int32)))[1]

    return map_blocks(block_topk, block, q, w, q_pos, q_seg)
