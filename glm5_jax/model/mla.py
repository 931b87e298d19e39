"""Multi-head latent attention (MLA) with DeepSeek Sparse Attention.

Short sequences (length <= index_topk) see every visible key, so DSA equals dense attention and runs as
dense causal MLA. Longer ones attend to each query's top-k keys only, in the absorbed (MQA) form: the
selected keys are gathered from the 576-wide latent cache (c_kv | k_rope) in blocks of queries, so no
[length, length] attention exists. Every query block is rematerialised: the backward pass recomputes its
gathered keys, scores and probabilities (and in DSA training the indexer's scores) from the block's
queries, so what a layer keeps for the backward grows with the tokens alone (docs/model.md, "Long context").

`dsa_mode` (docs/losses.md) selects how the indexer trains: "sparse" (default; no indexer loss),
"warmup" (attention stays dense at every length, in query blocks when length > index_topk; the indexer's
KL against the dense attention is returned) and "sparse_adapt" (top-k attention; KL over the selected
keys). In both training modes the indexer's inputs are detached, so no gradient passes between the
indexer and the rest of the model.

Generation (docs/generation.md) shares this code: `forward(..., with_cache=True)` also returns what a
decode cache keeps of the tokens (the latent and the indexer key), and `decode` runs new tokens over that
cache with the same absorbed kernels (`_attend`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax.model.blocks import map_blocks
from glm5_jax.model.dsa import Indexer, indexer_kl, select_topk, visible
from glm5_jax.model.norms import RMSNorm
from glm5_jax.model.params import make_param
from glm5_jax.model.rope import apply_rope
from glm5_jax.sharding.context import constrain

# Masked logits get the lowest finite float, not -inf: a row with no visible key (the padding of the
# last query block) then softmaxes to finite values instead of NaN, which would poison gradients.
MASKED = float(jnp.finfo(jnp.float32).min)
DSA_MODES = ("sparse", "warmup", "sparse_adapt")


class MLA(nnx.Module):
    def __init__(self, cfg, *, has_indexer: bool, stack: int | None, rngs: nnx.Rngs):
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.cfg, self.dtype = cfg, jnp.dtype(cfg.dtype)
        H = cfg.num_attention_heads
        self.q_a_proj = make_param(rngs, (cfg.hidden_size, cfg.q_lora_rank), ("embed", "q_lora"),
                                   stack=stack, dtype=pd, std=std)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, axis="q_lora", stack=stack, param_dtype=pd)
        self.q_b_proj = make_param(rngs, (cfg.q_lora_rank, H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"),
                                   stack=stack, dtype=pd, std=std)
        self.kv_a_proj_with_mqa = make_param(rngs, (cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                                             ("embed", "kv_lora"), stack=stack, dtype=pd, std=std)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, axis="kv_lora", stack=stack, param_dtype=pd)
        self.kv_b_proj = make_param(rngs, (cfg.kv_lora_rank, H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                    ("kv_lora", "heads", "head_dim"), stack=stack, dtype=pd, std=std)
        self.o_proj = make_param(rngs, (H, cfg.v_head_dim, cfg.hidden_size), ("heads", "head_dim", "embed"),
                                 stack=stack, dtype=pd, std=std)
        self.indexer = Indexer(cfg, stack=stack, rngs=rngs) if has_indexer else None

    def w(self, p):
        return p[...].astype(self.dtype)

    def __call__(self, x, cos, sin, segment_ids, topk_idx, dsa_mode: str = "sparse"):
        """x [B, L, D] -> (output [B, L, D], top-k indices for layers that share them or None if dense,
        indexer KL summed over the queries of real tokens (segment id > 0), or None when not computed)."""
        return self.forward(x, cos, sin, segment_ids, topk_idx, dsa_mode)[:3]

    def project(self, x, cos, sin):
        """The query side and the latent KV of tokens x [B, L, D]: (c_q, q_nope, q_rope, c_kv, k_rope)."""
        cfg = self.cfg
        nope = cfg.qk_nope_head_dim
        c_q = self.q_a_layernorm(x @ self.w(self.q_a_proj))
        q = jnp.einsum("blr,rhd->blhd", c_q, self.w(self.q_b_proj))
        q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin)
        kv_a = x @ self.w(self.kv_a_proj_with_mqa)
        c_kv = self.kv_a_layernorm(kv_a[..., : cfg.kv_lora_rank])
        k_rope = apply_rope(kv_a[..., cfg.kv_lora_rank:], cos, sin)
        return c_q, q_nope, q_rope, c_kv, k_rope

    def forward(self, x, cos, sin, segment_ids, topk_idx, dsa_mode: str = "sparse", *, with_cache: bool = False):
        """`__call__`'s results plus, with `with_cache`, what a decode cache keeps of these tokens: (latent
        [B, L, kv_lora_rank + qk_rope_head_dim] = c_kv | k_rope, indexer keys [B, L, index_head_dim] or
        None for a layer without an indexer); None without `with_cache`."""
        cfg = self.cfg
        if dsa_mode not in DSA_MODES:
            raise ValueError(f"dsa_mode must be one of {', '.join(DSA_MODES)}; got {dsa_mode!r}")
        c_q, q_nope, q_rope, c_kv, k_rope = self.project(x, cos, sin)
        # Context parallelism: queries stay in their sequence shard; the latent KV (576 numbers a token) is
        # gathered whole, which is what makes MLA cheap to split by sequence.
        c_kv, k_rope = (constrain(a, ("batch", None, None)) for a in (c_kv, k_rope))
        key_segments = constrain(segment_ids, ("batch", None))
        scale = cfg.qk_head_dim ** -0.5
        length = x.shape[1]
        train_indexer = dsa_mode != "sparse" and self.indexer is not None
        sparse = length > cfg.index_topk and dsa_mode != "warmup"
        index = None
        if train_indexer:  # detached inputs: the indexer learns from its KL only, the model never from it
            index = self.indexer.project(jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q), cos, sin)
        elif self.indexer is not None and (sparse or with_cache):
            index = self.indexer.project(x, c_q, cos, sin)
        kl_index = index if train_indexer else None
        kl = None
        if sparse:
            if self.indexer is not None:
                qi, ki, wi = index
                topk_idx = select_topk(self.indexer, qi, ki, wi, segment_ids, cfg.index_topk,
                                       cfg.attention_query_block)
            out, kl = self._sparse(q_nope, q_rope, c_kv, k_rope, segment_ids, key_segments, topk_idx, scale,
                                   kl_index)
        elif train_indexer or length > cfg.index_topk:
            out, kl = self._dense_blocked(q_nope, q_rope, c_kv, k_rope, segment_ids, key_segments, scale,
                                          kl_index)
            topk_idx = None
        else:
            out = self._dense(q_nope, q_rope, c_kv, k_rope, segment_ids, key_segments, scale)
            topk_idx = None
        if kl is not None:
            kl = jnp.sum(jnp.where(segment_ids > 0, kl, 0.0))
        cache = None
        if with_cache:
            cache = (jnp.concatenate([c_kv, k_rope], axis=-1), None if index is None else index[1])
        return jnp.einsum("blhv,hvd->bld", out, self.w(self.o_proj)), topk_idx, kl, cache

    def decode(self, x, cos, sin, positions, latent, index_keys, topk_idx):
        """Attention of new tokens x [B, Q, D] at `positions` [B, Q] over a decode cache, in absorbed form.

        latent [B, T, kv_lora_rank + qk_rope_head_dim] and index_keys [B, T, index_head_dim] (None for a
        layer without an indexer) hold slot s = position s of each row; the new tokens' entries are written
        first, then query p sees slots <= p. With T > index_topk the indexer scores the cached keys and each
        query attends to its top-k (a layer without an indexer uses `topk_idx`, the previous full layer's).
        -> (output [B, Q, D], top-k indices [B, Q, index_topk] or None, latent, index_keys).
        """
        cfg = self.cfg
        c_q, q_nope, q_rope, c_kv, k_rope = self.project(x, cos, sin)
        latent = write_slots(latent, positions, jnp.concatenate([c_kv, k_rope], axis=-1).astype(latent.dtype))
        latent = constrain(latent, ("batch", None, None))
        ok = jnp.arange(latent.shape[1]) <= positions[..., None]  # [B, Q, T]
        sparse = latent.shape[1] > cfg.index_topk
        if self.indexer is not None:
            qi, ki, wi = self.indexer.project(x, c_q, cos, sin)
            index_keys = constrain(write_slots(index_keys, positions, ki.astype(index_keys.dtype)),
                                   ("batch", None, None))
            if sparse:
                scores = jnp.where(ok, self.indexer.scores(qi, index_keys.astype(jnp.float32), wi), -jnp.inf)
                topk_idx = jax.lax.top_k(scores, cfg.index_topk)[1].astype(jnp.int32)
        scale = cfg.qk_head_dim ** -0.5
        r = cfg.kv_lora_rank
        if sparse:
            sel = jax.vmap(lambda a, i: a[i])(latent, topk_idx)  # [B, Q, K, C]
            out, _ = self._attend(q_nope, q_rope, sel[..., :r], sel[..., r:],
                                           topk_idx <= positions[..., None], scale, *self._absorbed())
        else:
            topk_idx = None
            out, _ = self._attend(q_nope, q_rope, latent[..., :r], latent[..., r:], ok, scale, *self._absorbed())
        return jnp.einsum("blhv,hvd->bld", out, self.w(self.o_proj)), topk_idx, latent, index_keys

    def _absorbed(self):
        nope = self.cfg.qk_nope_head_dim
        kv_b = self.w(self.kv_b_proj)
        return kv_b[..., :nope], kv_b[..., nope:]

    def _attend(self, qn, qr, c_kv, k_rope, ok, scale, w_uk, w_uv):
        """Absorbed attention of queries [B, Q, H, .] over keys: shared by all queries (c_kv [B, K, C],
        k_rope [B, K, R]) or each query's own (c_kv [B, Q, K, C], k_rope [B, Q, K, R]), where `ok` [B, Q, K],
        with kv_b_proj's key and value halves w_uk, w_uv (`_absorbed`) -> (output [B, Q, H, v_head_dim],
        float32 probabilities [B, Q, H, K])."""
        keys = "bk" if c_kv.ndim == 3 else "bqk"  # shared keys, or per-query gathered ones
        q_lat = jnp.einsum("bqhn,chn->bqhc", qn, w_uk)
        f32 = jnp.float32  # scores accumulate in float32; the gathered keys stay in the model dtype
        s = (jnp.einsum(f"bqhc,{keys}c->bqhk", q_lat, c_kv, preferred_element_type=f32)
             + jnp.einsum(f"bqhr,{keys}r->bqhk", qr, k_rope, preferred_element_type=f32))
        s = jnp.where(ok[:, :, None, :], s * scale, MASKED)
        p32 = jax.nn.softmax(s, axis=-1)
        o_lat = jnp.einsum(f"bqhk,{keys}c->bqhc", p32.astype(self.dtype), c_kv)
        return jnp.einsum("bqhc,chv->bqhv", o_lat, w_uv), p32

    def _dense(self, q_nope, q_rope, c_kv, k_rope, segment_ids, key_segments, scale):
        kv = jnp.einsum("blc,chd->blhd", c_kv, self.w(self.kv_b_proj))
        k_nope, v = kv[..., : self.cfg.qk_nope_head_dim], kv[..., self.cfg.qk_nope_head_dim:]
        s = jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope)
        index = jnp.arange(q_nope.shape[1])
        ok = visible(index[:, None], index[None, :], segment_ids[:, :, None], key_segments[:, None, :])
        s = jnp.where(ok[:, None], s.astype(jnp.float32) * scale, MASKED)
        p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    def _dense_blocked(self, q_nope, q_rope, c_kv, k_rope, segment_ids, key_segments, scale, index):
        """Dense attention over every visible key in absorbed form, one query block at a time (DSA warm-up
        at any length, and shared-indexer layers then). With `index` = the indexer's (q, k, w), also the
        per-query indexer KL over all visible keys."""
        w_uk, w_uv = self._absorbed()
        k_index = jnp.arange(q_nope.shape[1])
        ki = None if index is None else constrain(index[1], ("batch", None, None))

        def block(qn, qr, q_index, q_segment, *qw):
            ok = visible(q_index[..., None], k_index, q_segment[..., None], key_segments[:, None, :])
            out, p32 = self._attend(qn, qr, c_kv, k_rope, ok, scale, w_uk, w_uv)
            if not qw:
                return out, None
            return out, indexer_kl(p32, self.indexer.scores(qw[0], ki, qw[1]), ok)

        q_index = jnp.broadcast_to(k_index, segment_ids.shape)
        extra = () if index is None else (index[0], index[2])
        return map_blocks(block, self.cfg.attention_query_block, q_nope, q_rope, q_index, segment_ids, *extra,
                          remat=True)

    def _sparse(self, q_nope, q_rope, c_kv, k_rope, segment_ids, key_segments, topk_idx, scale, index=None):
        """Attention over each query's top-k keys; with `index` (sparse adaptation) also the per-query
        indexer KL restricted to those keys."""
        w_uk, w_uv = self._absorbed()
        gather = jax.vmap(lambda a, i: a[i])  # per batch row: [L, ...][Q, K] -> [Q, K, ...]
        ki = None if index is None else constrain(index[1], ("batch", None, None))

        def block(qn, qr, idx, q_index, q_segment, *qw):
            ok = visible(q_index[..., None], idx, q_segment[..., None], gather(key_segments, idx))
            out, p32 = self._attend(qn, qr, gather(c_kv, idx), gather(k_rope, idx), ok, scale, w_uk,
                                             w_uv)
            if not qw:
                return out, None
            return out, indexer_kl(p32, self.indexer.scores_at(qw[0], gather(ki, idx), qw[1]), ok)

        q_index = jnp.broadcast_to(jnp.arange(q_nope.shape[1]), segment_ids.shape)
        extra = () if index is None else (index[0], index[2])
        return map_blocks(block, self.cfg.attention_query_block, q_nope, q_rope, topk_idx, q_index, segment_ids,
                          *extra, remat=True)


def write_slots(cache, positions, values):
    """cache [B, T, ...] with values [B, Q, ...] written at slots `positions` [B, Q]; slots outside [0, T)
    are dropped."""
    positions = jnp.where(positions < 0, cache.shape[1], positions)  # negative: dropped, not wrapped
    return jax.vmap(lambda c, p, v: c.at[p].set(v, mode="drop"))(cache, positions, values)
