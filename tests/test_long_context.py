"""Long-context memory paths against direct references (tiny preset, float32):

- the indexer's streamed, causally skipped top-k (glm5_jax/model/dsa.select_topk) against lax.top_k over
  every key, ties included, on one device and per context shard (whose scores never leave the device);
- rematerialised sparse attention: output and every gradient against a dense [L, L] attention masked to
  each query's selected keys;
- the blocked LM and MTP cross-entropies (logits_block) against one block: loss and every gradient.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5_jax import config
from glm5_jax.model import GLM5
from glm5_jax.model.dsa import Indexer, select_topk, visible
from glm5_jax.model.mla import MASKED, MLA
from glm5_jax.model.rope import inverse_frequencies, rope_angles
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.sharding.layout import ParallelConfig
from glm5_jax.train import losses as LS
from glm5_jax.train import step as S
from tests.step_util import loss_and_grads, two_document_batch

B, L = 2, 88  # index_topk 16, query block 16: 6 blocks, key chunks of 16 with a padded tail


@pytest.fixture(scope="module")
def cfg():
    return config.load("tiny", ["expert_matmul=tiled"])


def rope(cfg, positions):
    return rope_angles(jnp.asarray(positions), inverse_frequencies(cfg.qk_rope_head_dim, cfg.rope_parameters),
                       jnp.float32)


def segments_of(length=L):
    seg = np.ones((B, length), np.int32)
    seg[:, 50:] = 2  # a second document in every row
    seg[1, 80:] = 0  # and padding in one
    return jnp.asarray(seg)


def indexer_inputs(cfg):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, L, cfg.index_n_heads, cfg.index_head_dim)).astype(np.float32)
    k = rng.standard_normal((B, L, cfg.index_head_dim)).astype(np.float32)
    k[:, 40:48] = k[:, 8:16]  # equal keys in other chunks: ties that must go to the lower index
    k[:, 60:64] = k[:, 56:60]
    w = rng.standard_normal((B, L, cfg.index_n_heads)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)


def full_topk(indexer, q, k, w, seg, topk):
    pos = jnp.arange(L)
    ok = visible(pos[:, None], pos[None, :], seg[:, :, None], seg[:, None, :])
    return jax.lax.top_k(jnp.where(ok, indexer.scores(q, k, w), -jnp.inf), topk)[1]


def test_streamed_topk_is_the_full_topk(cfg):
    indexer = Indexer(cfg, stack=None, rngs=nnx.Rngs(0))
    q, k, w = indexer_inputs(cfg)
    seg = segments_of()
    want = np.asarray(full_topk(indexer, q, k, w, seg, cfg.index_topk))
    got = np.asarray(jax.jit(lambda *a: select_topk(indexer, *a, seg, cfg.index_topk, 16))(q, k, w))
    np.testing.assert_array_equal(got, want)
    # Per context shard (4 shards of 22 queries, blocks of 16 padded), with batch and tensor axes beside it.
    par = Parallelism.create(ParallelConfig(mesh={"context": 4, "data": 2}))
    q, w, seg = (jax.device_put(a, par.sharding(("batch", "length"))) for a in (q, w, seg))
    k = jax.device_put(k, par.sharding(("batch", "length")))
    with use(par):
        fn = jax.jit(lambda *a: select_topk(indexer, *a, cfg.index_topk, 16))
        np.testing.assert_array_equal(np.asarray(fn(q, k, w, seg)), want)
        hlo = fn.lower(q, k, w, seg).compile().as_text()
    # Only the indexer keys cross devices: no collective carries anything of the scores' size.
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"= \w+\[([\d,]*)\][^\n]*? (?:all-gather|all-to-all|collective-permute)\(",
                                    hlo)]
    assert sizes and max(sizes) <= B * L * cfg.index_head_dim, sizes


def dense_reference(layer, cfg, x, cos, sin, seg):
    """The layer's sparse output as dense attention over [L, L], masked to each query's selected keys."""
    c_q, q_nope, q_rope, c_kv, k_rope = layer.project(x, cos, sin)
    qi, ki, wi = layer.indexer.project(x, c_q, cos, sin)
    idx = select_topk(layer.indexer, qi, ki, wi, seg, cfg.index_topk, cfg.attention_query_block)
    chosen = jnp.zeros((B, L, L), bool).at[jnp.arange(B)[:, None, None], jnp.arange(L)[None, :, None], idx].set(True)
    pos = jnp.arange(L)
    ok = chosen & visible(pos[:, None], pos[None, :], seg[:, :, None], seg[:, None, :])
    kv = jnp.einsum("blc,chd->blhd", c_kv, layer.kv_b_proj[...])
    k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    s = jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope)
    p = jax.nn.softmax(jnp.where(ok[:, None], s * cfg.qk_head_dim ** -0.5, MASKED), axis=-1)
    return jnp.einsum("bqhv,hvd->bqd", jnp.einsum("bhqk,bkhd->bqhd", p, v), layer.o_proj[...])


def test_rematerialised_sparse_attention_gradients(cfg):
    layer = MLA(cfg, has_indexer=True, stack=None, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((B, L, cfg.hidden_size)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((B, L, cfg.hidden_size)), jnp.float32)
    positions = np.concatenate([np.arange(50), np.arange(L - 50)])[None].repeat(B, 0)
    cos, sin = rope(cfg, positions)
    seg = segments_of()
    real = (seg > 0)[..., None]

    def objective(forward):
        return lambda st, x: jnp.sum(jnp.where(real, forward(nnx.merge(graphdef, st), x), 0.0) * probe)

    ours = objective(lambda m, x: m(x, cos, sin, seg, None)[0])
    ref = objective(lambda m, x: dense_reference(m, cfg, x, cos, sin, seg))
    (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(state, x) for f in (ours, ref))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)  # a sum of signed terms: its relative error is loose
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_blocked_cross_entropy_equals_one_block(cfg):
    loss_cfg = LS.LossConfig(z_loss=1e-3, mtp_weight=0.3, balance_weight=0.0, bias_update_rate=0.0)
    batch = two_document_batch(cfg.vocab_size, 4, 40)
    results = []
    heads = 1 + cfg.mtp_depths  # the main head and the MTP depths share each block's logits rows
    for block in (40 * heads, 12 * heads):  # one block; four blocks, the last padded
        c = config.from_dict({**cfg.to_dict(), "logits_block": block})
        state = S.split(GLM5(c, rngs=nnx.Rngs(0)))
        results.append(loss_and_grads(state, batch, loss_cfg=loss_cfg))
    ((l1, a1), g1), ((l2, a2), g2) = results
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for name in ("lm", "mtp", "z"):
        np.testing.assert_allclose(a2["metrics"][name], a1["metrics"][name], rtol=1e-6)
    for name in g1:
        scale = float(np.max(np.abs(g1[name])))
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-5, atol=1e-6 * scale, err_msg=name)
