"""Dense attention in blocks with an online softmax (flash attention), and the TPU splash kernel.

`attend` is one block of queries against the key blocks it can see, in MLA's absorbed (MQA) form: every
head's query (576 wide: the latent part `q_nope @ W_uk` and the RoPE part) against one shared key array
(the latent cache c_kv | k_rope), whose first `width` columns (c_kv) are also the values. Key blocks run
in a loop with a running max and sum; the loop covers only the blocks from the one holding the earliest
document start of the block's queries to the one holding its last query (`key_block_range`), so blocks
above the causal diagonal and before every query's document are never computed. It is a `custom_vjp`:
the forward keeps the output and the log-sum-exp, nothing per key block, and the backward recomputes
each key block's scores from them.

On a TPU the expanded form (per-head keys and values, 256 wide) runs through the splash-attention kernel
that ships with JAX (`splash`), where it applies (`dense_kernel`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glm5_jax import scopes
from glm5_jax.model.blocks import map_blocks
from glm5_jax.model.dsa import visible
from glm5_jax.model.rope import apply_rope

MASKED = float(jnp.finfo(jnp.float32).min)
# The splash kernel's tiles (queries and keys, forward and backward); lengths must be whole numbers of them.
# Its default 128 fails to compile from 128K tokens on a TPU v5p: the block-mask table it prefetches into
# scalar memory outgrows it (2 MiB against 1 MiB); 512-wide tiles need a sixteenth of that.
SPLASH_BLOCK = 512


def document_starts(segments):
    """The row index of the first token of each position's document [B, L] (segment ids [B, L]; a change of
    id starts a document)."""
    index = jnp.arange(segments.shape[1], dtype=jnp.int32)
    change = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(change, index, 0), axis=1)


def key_block_range(q_pos, q_first, block: int):
    """(first, last) key block that queries at rows q_pos (< 0: padding, sees nothing) whose documents start
    at rows q_first can see; first > last when none can."""
    real = q_pos >= 0
    first = jnp.min(jnp.where(real, q_first, jnp.iinfo(jnp.int32).max)) // block
    return first, jnp.max(jnp.where(real, q_pos, -1)) // block


def _scores(q, k, q_pos, q_seg, k_seg, j, scale, block):
    """Masked float32 scores [B, Q, H, block] of queries q [B, Q, H, D] against key block j of k [B, Lk, D],
    the visibility [B, Q, 1, block] and the block's keys."""
    kj = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
    ok = visible(q_pos[..., None], j * block + jnp.arange(block), q_seg[..., None],
                 jax.lax.dynamic_slice_in_dim(k_seg, j * block, block, axis=1)[:, None, :])[:, :, None]
    s = jnp.einsum("bqhd,bkd->bqhk", q, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(ok, s, MASKED), ok, kj


def _forward(q, k, q_pos, q_seg, k_seg, bounds, scale, block, width):
    def step(j, carry):
        m, l, acc = carry
        s, ok, kj = _scores(q, k, q_pos, q_seg, k_seg, j, scale, block)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[..., None] + jnp.einsum("bqhk,bkc->bqhc", p.astype(k.dtype), kj[..., :width],
                                                       preferred_element_type=jnp.float32)
        return m_new, l * correction + p.sum(axis=-1), acc

    shape = q.shape[:3]
    init = (jnp.full(shape, MASKED), jnp.zeros(shape), jnp.zeros((*shape, width)))
    with jax.named_scope(scopes.FLASH_KEYS):
        m, l, acc = jax.lax.fori_loop(bounds[0], bounds[1] + 1, step, init)
    l = jnp.where(l > 0, l, 1.0)  # a query that sees no key (padding) gets 0
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def attend(q, k, q_pos, q_seg, k_seg, bounds, scale: float, block: int, width: int):
    """Attention output [B, Q, H, width] of one query block q [B, Q, H, D] over keys k [B, Lk, D] whose first
    `width` columns are the values; q_pos / q_seg [B, Q], k_seg [B, Lk] (Lk a whole number of `block`s),
    bounds = `key_block_range` of the block: the key blocks computed."""
    return _forward(q, k, q_pos, q_seg, k_seg, bounds, scale, block, width)[0]


def _attend_fwd(q, k, q_pos, q_seg, k_seg, bounds, scale, block, width):
    out, lse = _forward(q, k, q_pos, q_seg, k_seg, bounds, scale, block, width)
    return out, (q, k, q_pos, q_seg, k_seg, bounds, out, lse)


def _attend_bwd(scale, block, width, res, g):
    q, k, q_pos, q_seg, k_seg, bounds, out, lse = res
    g32 = g.astype(jnp.float32)
    delta = jnp.sum(g32 * out.astype(jnp.float32), axis=-1)[..., None]  # [B, Q, H, 1]
    g = g.astype(k.dtype)

    def step(j, carry):
        dq, dk = carry
        s, ok, kj = _scores(q, k, q_pos, q_seg, k_seg, j, scale, block)
        p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bqhc,bkc->bqhk", g, kj[..., :width], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta) * scale).astype(k.dtype)
        dq = dq + jnp.einsum("bqhk,bkd->bqhd", ds, kj, preferred_element_type=jnp.float32)
        dkj = jnp.einsum("bqhk,bqhd->bkd", ds, q, preferred_element_type=jnp.float32)
        dv = jnp.einsum("bqhk,bqhc->bkc", p.astype(k.dtype), g, preferred_element_type=jnp.float32)
        dkj = dkj.at[..., :width].add(dv)
        old = jax.lax.dynamic_slice_in_dim(dk, j * block, block, axis=1)
        return dq, jax.lax.dynamic_update_slice_in_dim(dk, old + dkj, j * block, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32))
    with jax.named_scope(scopes.FLASH_KEYS):
        dq, dk = jax.lax.fori_loop(bounds[0], bounds[1] + 1, step, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), None, None, None, None


attend.defvjp(_attend_fwd, _attend_bwd)


def dense_kernel(platform: str, context: int, length: int, head_dims: tuple[int, ...]) -> str:
    """"splash" where the TPU kernel applies (a TPU program, sequence not split over devices, whole tiles,
    head widths multiples of 128), else "blocked" (`attend`)."""
    fits = length % SPLASH_BLOCK == 0 and all(d % 128 == 0 for d in head_dims)
    return "splash" if platform == "tpu" and context == 1 and fits else "blocked"


def splash(q, k, v, segments, interpret: bool = False):
    """Causal attention within documents by JAX's TPU splash kernel: q, k [B, L, H, Dk] (q already scaled),
    v [B, L, H, Dv], segment ids [B, L] -> [B, L, H, Dv]. `interpret`: Pallas interpret mode (any backend)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, L, H, _ = q.shape
    mask = sa.MultiHeadMask([sa.CausalMask((L, L)) for _ in range(H)])
    b = SPLASH_BLOCK
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    kernel = sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    heads = lambda a: jnp.swapaxes(a, 1, 2)  # [B, H, L, D]: the kernel's layout
    run = lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))
    return heads(jax.vmap(run)(heads(q), heads(k), heads(v), segments))


def head_queries(c_q, w_q, nope: int, cos, sin):
    """Per-head queries (q_nope [B, L, H, nope], RoPE'd q_rope [B, L, H, .]) of query latents c_q [B, L, r]."""
    q = jnp.einsum("blr,rhd->blhd", c_q, w_q)
    return q[..., :nope], apply_rope(q[..., nope:], cos, sin)


def blocked(c_q, cos, sin, q_pos, q_first, q_seg, c_kv, k_rope, k_seg, w_q, w_uk, w_uv, w_o=None, *,
            scale: float, block: int):
    """Dense MLA attention of queries (latents c_q [B, Q, r], RoPE angles, rows q_pos, document starts
    q_first, segments q_seg [B, Q]) over every key (c_kv [B, L, C], k_rope [B, L, R], segments k_seg [B, L])
    in blocks of `block` queries x `block` keys; w_q = q_b_proj, w_uk / w_uv = kv_b_proj's key and value
    halves. -> the per-head output [B, Q, H, v_head_dim], or with o_proj `w_o` the output [B, Q, D]. Each
    query block goes from c_q to its output and is rematerialised: per-head queries (and, with w_o, outputs)
    exist for one block at a time, in the forward and the backward."""
    width, pad = c_kv.shape[-1], -c_kv.shape[1] % block
    k = jnp.pad(jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1), ((0, 0), (0, pad), (0, 0)))
    k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)), constant_values=-1)  # padded keys: seen by no query

    def one(cq, cos_b, sin_b, row, first, seg):
        pos = row - 1  # rows come in 1-based, so the loop's zero padding reads as "no query" (-1)
        qn, qr = head_queries(cq, w_q, w_uk.shape[-1], cos_b, sin_b)
        q = jnp.concatenate([jnp.einsum("bqhn,chn->bqhc", qn, w_uk), qr], axis=-1)
        out = attend(q, k, pos, seg, k_seg, key_block_range(pos, first, block), scale, block, width)
        out = jnp.einsum("bqhc,chv->bqhv", out, w_uv)
        return out if w_o is None else jnp.einsum("bqhv,hvd->bqd", out, w_o)

    return map_blocks(one, block, c_q, cos, sin, q_pos + 1, q_first, q_seg, remat=True)
