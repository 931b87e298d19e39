"""Multi-head latent attention (MLA) with DeepSeek Sparse Attention.

Short sequences (length <= index_topk) see every visible key, so DSA equals dense attention and runs as
dense causal MLA. Longer ones attend to each query's top-k keys only, in the absorbed (MQA) form: the
selected keys are gathered from the 576-wide latent cache (c_kv | k_rope) in blocks of queries, so no
[length, length] attention exists. Every query block is rematerialised: the backward pass recomputes its
gathered keys, scores and probabilities (and in DSA training the indexer's scores) from the block's
queries, so what a layer keeps for the backward grows with the tokens alone (docs/model.md, "Long context").

`dsa_mode` "dense" (docs/losses.md) runs no indexer and attends to every visible key, above one query block
in query x key blocks with an online softmax (`flash.py`; JAX's splash kernel on a TPU). The other modes
select how the indexer trains: "sparse" (default; no indexer loss),
"warmup" (attention stays dense at every length, in query blocks when length > index_topk; the indexer's
KL against the dense attention is returned) and "sparse_adapt" (top-k attention; KL over the selected
keys). In both training modes the indexer's inputs are detached, so no gradient passes between the
indexer and the rest of the model.

Generation (docs/generation.md) shares this code: `forward(..., with_cache=True)` also returns what a
decode cache keeps of the tokens (the latent and the indexer key), and `decode` runs new tokens over that
cache with the same absorbed kernels (`_attend`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax.model import flash
from glm5_jax.model.blocks import map_blocks
from glm5_jax.model.dsa import Indexer, indexer_kl, select_topk, visible
from glm5_jax.model.norms import RMSNorm
from glm5_jax.model.params import make_param
from glm5_jax.model.rope import apply_rope
from glm5_jax.sharding.context import axis_size, constrain, per_shard, platform

# Masked logits get the lowest finite float, not -inf: a row with no visible key (the padding of the
# last query block) then softmaxes to finite values instead of NaN, which would poison gradients.
MASKED = float(jnp.finfo(jnp.float32).min)
DSA_MODES = ("sparse", "dense", "warmup", "sparse_adapt")


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
        c_q, c_kv, k_rope = self.latents(x, cos, sin)
        return (c_q, *self.queries(c_q, cos, sin), c_kv, k_rope)

    def latents(self, x, cos, sin):
        """The query latent c_q [B, L, q_lora_rank] and the KV latent c_kv [B, L, kv_lora_rank], k_rope."""
        cfg = self.cfg
        c_q = self.q_a_layernorm(x @ self.w(self.q_a_proj))
        kv_a = x @ self.w(self.kv_a_proj_with_mqa)
        c_kv = self.kv_a_layernorm(kv_a[..., : cfg.kv_lora_rank])
        return c_q, c_kv, apply_rope(kv_a[..., cfg.kv_lora_rank:], cos, sin)

    def queries(self, c_q, cos, sin):
        """Per-head queries (q_nope [B, L, H, qk_nope_head_dim], q_rope [B, L, H, qk_rope_head_dim]) of c_q."""
        return flash.head_queries(c_q, self.w(self.q_b_proj), self.cfg.qk_nope_head_dim, cos, sin)

    def forward(self, x, cos, sin, segment_ids, topk_idx, dsa_mode: str = "sparse", *, with_cache: bool = False):
        """`__call__`'s results plus, with `with_cache`, what a decode cache keeps of these tokens: (latent
        [B, L, kv_lora_rank + qk_rope_head_dim] = c_kv | k_rope, indexer keys [B, L, index_head_dim] or
        None for a layer without an indexer); None without `with_cache`."""
        cfg = self.cfg
        if dsa_mode not in DSA_MODES:
            raise ValueError(f"dsa_mode must be one of {', '.join(DSA_MODES)}; got {dsa_mode!r}")
        c_q, c_kv, k_rope = self.latents(x, cos, sin)
        # Context parallelism: queries stay in their sequence shard; the latent KV (576 numbers a token) is
        # gathered whole, which is what makes MLA cheap to split by sequence.
        c_kv, k_rope = (constrain(a, ("batch", None, None)) for a in (c_kv, k_rope))
        key_segments = constrain(segment_ids, ("batch", None))
        length = x.shape[1]
        train_indexer = dsa_mode in ("warmup", "sparse_adapt") and self.indexer is not None
        sparse = length > cfg.index_topk and dsa_mode in ("sparse", "sparse_adapt")
        index = None
        if train_indexer:  # detached inputs: the indexer learns from its KL only, the model never from it
            index = self.indexer.project(jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q), cos, sin)
        elif self.indexer is not None and (sparse or with_cache):
            index = self.indexer.project(x, c_q, cos, sin)
        kl = None
        if dsa_mode == "dense" and length > cfg.attention_query_block:
            out = self._flash(c_q, cos, sin, c_kv, k_rope, segment_ids, key_segments)
        elif sparse or train_indexer or length > cfg.index_topk and dsa_mode != "dense":
            if sparse and self.indexer is not None:
                topk_idx = select_topk(self.indexer, *index, segment_ids, cfg.index_topk, cfg.attention_query_block)
            out, kl = self._blocks(c_q, cos, sin, c_kv, k_rope, segment_ids, key_segments,
                                   topk_idx if sparse else None, index if train_indexer else None)
        else:
            out = self._dense(*self.queries(c_q, cos, sin), c_kv, k_rope, segment_ids, key_segments)
        if not sparse:
            topk_idx = None
        if kl is not None:
            kl = jnp.sum(jnp.where(segment_ids > 0, kl, 0.0))
        cache = None
        if with_cache:
            cache = (jnp.concatenate([c_kv, k_rope], axis=-1), None if index is None else index[1])
        return out, topk_idx, kl, cache

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

    def _dense(self, q_nope, q_rope, c_kv, k_rope, segment_ids, key_segments):
        """Dense causal attention over [L, L] with the keys and values expanded per head (short sequences)."""
        scale = self.cfg.qk_head_dim ** -0.5
        kv = jnp.einsum("blc,chd->blhd", c_kv, self.w(self.kv_b_proj))
        k_nope, v = kv[..., : self.cfg.qk_nope_head_dim], kv[..., self.cfg.qk_nope_head_dim:]
        s = jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope)
        index = jnp.arange(q_nope.shape[1])
        ok = visible(index[:, None], index[None, :], segment_ids[:, :, None], key_segments[:, None, :])
        s = jnp.where(ok[:, None], s.astype(jnp.float32) * scale, MASKED)
        p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
        return jnp.einsum("bqhv,hvd->bqd", jnp.einsum("bhqk,bkhd->bqhd", p, v), self.w(self.o_proj))

    def _flash(self, c_q, cos, sin, c_kv, k_rope, segment_ids, key_segments):
        """Dense causal attention [B, L, D] in query x key blocks with an online softmax (`flash.blocked`, run
        on each device's own queries against the gathered latent keys), or JAX's splash kernel on a TPU."""
        cfg = self.cfg
        scale, nope, kv_b = cfg.qk_head_dim ** -0.5, cfg.qk_nope_head_dim, self.w(self.kv_b_proj)
        kernel = flash.dense_kernel(platform(), axis_size("length"), c_q.shape[1], (cfg.qk_head_dim, cfg.v_head_dim))
        if kernel == "splash":  # expanded form: per-head keys (nope | shared rope) and values
            qn, qr = self.queries(c_q, cos, sin)
            kv = jnp.einsum("blc,chd->blhd", c_kv, kv_b)
            k_r = jnp.broadcast_to(k_rope[:, :, None], (*kv.shape[:3], k_rope.shape[-1]))
            q = (jnp.concatenate([qn, qr], axis=-1) * scale).astype(self.dtype)
            heads = ("batch", "length", "act_heads", None)  # a Pallas kernel: run on each device's shards
            out = per_shard(flash.splash, (heads,) * 3 + (("batch", "length"),), heads)(
                q, jnp.concatenate([kv[..., :nope], k_r], axis=-1), kv[..., nope:], segment_ids)
        else:
            rows = jnp.broadcast_to(jnp.arange(c_q.shape[1], dtype=jnp.int32), segment_ids.shape)
            first = constrain(flash.document_starts(key_segments), ("batch", "length"))
            local = functools.partial(flash.blocked, scale=scale, block=cfg.attention_query_block)
            seq, whole, heads = ("batch", "length"), ("batch", None, None), (None, "heads", None)
            # Heads split over devices: per-head outputs leave the loop and o_proj sums them outside. Else
            # o_proj runs inside each block, so no per-head output of the whole sequence exists.
            split = axis_size("heads") > 1
            w_o = () if split else (self.w(self.o_proj),)
            in_axes = ((seq + (None,),) * 3 + (seq,) * 3 + (whole, whole, ("batch", None)) + (heads,) * 3
                       + ((None,) * 3,) * len(w_o))
            out = per_shard(local, in_axes, seq + (("act_heads", None) if split else (None,)))(
                c_q, cos, sin, rows, first, segment_ids, c_kv, k_rope, key_segments, self.w(self.q_b_proj),
                kv_b[..., :nope], kv_b[..., nope:], *w_o)
            if not split:
                return out
        return jnp.einsum("blhv,hvd->bld", out, self.w(self.o_proj))

    def _blocks(self, c_q, cos, sin, c_kv, k_rope, segment_ids, key_segments, topk_idx, index):
        """Attention output [B, L, D] of queries c_q over keys in absorbed form, one query block at a time.

        topk_idx [B, L, K]: each query's selected keys (sparse); None: every visible key (dense in blocks:
        DSA warm-up, and long sequences without an indexer). With `index` = the indexer's (q, k, w) (DSA
        training), also the per-query indexer KL [B, L] over the same keys; else None. A block goes from its
        query latents to its output projection and is rematerialised, so the backward keeps per token only
        what the block reads (c_q, RoPE, key indices) and returns (the output), never per-head queries,
        gathered keys, scores or probabilities.
        """
        scale = self.cfg.qk_head_dim ** -0.5
        gather = jax.vmap(lambda a, i: a[i])  # per batch row: [L, ...][Q, K] -> [Q, K, ...]
        k_index = jnp.arange(c_kv.shape[1])
        ki = None if index is None else constrain(index[1], ("batch", None, None))

        def block(cq, cos_b, sin_b, q_index, q_segment, *extra):
            qn, qr = self.queries(cq, cos_b, sin_b)
            if topk_idx is None:
                ok = visible(q_index[..., None], k_index, q_segment[..., None], key_segments[:, None, :])
                keys = (c_kv, k_rope)
            else:
                idx, *extra = extra
                ok = visible(q_index[..., None], idx, q_segment[..., None], gather(key_segments, idx))
                keys = (gather(c_kv, idx), gather(k_rope, idx))
            out, p32 = self._attend(qn, qr, *keys, ok, scale, *self._absorbed())
            y = jnp.einsum("bqhv,hvd->bqd", out, self.w(self.o_proj))
            if index is None:
                return y, None
            qi = self.indexer.queries(jax.lax.stop_gradient(cq), cos_b, sin_b)
            scores = (self.indexer.scores(qi, ki, extra[0]) if topk_idx is None
                      else self.indexer.scores_at(qi, gather(ki, idx), extra[0]))
            return y, indexer_kl(p32, scores, ok)

        q_index = jnp.broadcast_to(k_index, segment_ids.shape)
        inputs = (c_q, cos, sin, q_index, segment_ids) + (() if topk_idx is None else (topk_idx,)) \
            + (() if index is None else (index[2],))
        return map_blocks(block, self.cfg.attention_query_block, *inputs, remat=True)


def write_slots(cache, positions, values):
    """cache [B, T, ...] with values [B, Q, ...] written at slots `positions` [B, Q]; slots outside [0, T)
    are dropped."""
    positions = jnp.where(positions < 0, cache.shape[1], positions)  # negative: dropped, not wrapped
    return jax.vmap(lambda c, p, v: c.at[p].set(v, mode="drop"))(cache, positions, values)
