"""`dsa: dense`: MLA over every visible key in query x key blocks (glm5_jax/model/flash.py), tiny preset, float32.

- the model in dense mode against transformers' GlmMoeDsaForCausalLM with index_topk above every document's
  length (every key selected), packed rows of several documents longer than one attention block;
- the blocked layer's output and every gradient against the unblocked [L, L] attention, on one device and
  per context shard;
- the key blocks computed: only those between each query block's earliest document start and its diagonal;
- no indexer work in dense mode, and a dense step with `trainable: no_indexer` leaves the indexer bitwise;
- the TPU splash kernel (Pallas interpret mode) against the blocked path.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from glm5_jax import config, scopes
from glm5_jax.checkpoint.naming import flatten
from glm5_jax.checkpoint.store import load_model
from glm5_jax.model import GLM5, flash
from glm5_jax.model import mla as mla_module
from glm5_jax.model.dsa import visible
from glm5_jax.model.mla import MLA
from glm5_jax.model.rope import inverse_frequencies, rope_angles
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.sharding.layout import ParallelConfig
from glm5_jax.train import losses as LS
from glm5_jax.train import step as S
from tests.step_util import microbatches, train_step, two_document_batch

B, L = 2, 88  # query block 16: 6 blocks, the last padded


def segments_of(length=L):
    seg = np.ones((B, length), np.int32)
    seg[0, 37:] = 2  # documents starting inside a block
    seg[0, 70:] = 3
    seg[1, 50:] = 2
    seg[1, 80:] = 0  # and padding
    return jnp.asarray(seg)


def positions_of(seg):
    """RoPE positions restarting at every document."""
    seg = np.asarray(seg)
    return jnp.asarray(np.arange(seg.shape[1]) - np.asarray(flash.document_starts(jnp.asarray(seg))))


def rope(cfg, positions):
    return rope_angles(positions, inverse_frequencies(cfg.qk_rope_head_dim, cfg.rope_parameters), jnp.float32)


def test_dense_mode_matches_transformers(hf_model_dir, convert):
    path, model = hf_model_dir(seed=5, index_topk=64)
    ours, _ = load_model(convert(path))
    lengths = [[21, 27, 8], [40, 16]]  # 56 tokens a row: 4 query blocks of 16, documents across them
    rng = np.random.default_rng(3)
    ids = rng.integers(2, model.config.vocab_size, (2, 56))
    seg = np.concatenate([np.repeat(np.arange(1, len(r) + 1), r)[None] for r in lengths])
    out = np.asarray(ours(jnp.asarray(ids), positions_of(seg), jnp.asarray(seg), mtp_depths=0,
                          dsa_mode="dense").logits)
    for row, docs in enumerate(lengths):
        start = 0
        for n in docs:  # transformers on each document alone: index_topk 64 >= its length selects every key
            with torch.no_grad():
                ref = model(torch.from_numpy(ids[row:row + 1, start:start + n])).logits.numpy()[0]
            assert np.abs(out[row, start:start + n] - ref).max() / np.abs(ref).max() < 1e-4, (row, start)
            start += n


@pytest.fixture(scope="module")
def cfg():
    return config.load("tiny", ["expert_matmul=tiled"])


def reference(layer, x, cos, sin, seg):
    """The unblocked dense attention: [L, L] scores, per-head keys and values."""
    c_q, c_kv, k_rope = layer.latents(x, cos, sin)
    return layer._dense(*layer.queries(c_q, cos, sin), c_kv, k_rope, seg, seg)


def test_blocked_gradients_equal_unblocked(cfg):
    layer = MLA(cfg, has_indexer=True, stack=None, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((B, L, cfg.hidden_size)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((B, L, cfg.hidden_size)), jnp.float32)
    seg = segments_of()
    cos, sin = rope(cfg, positions_of(seg))

    def objective(forward):
        return lambda st, x: jnp.sum(forward(nnx.merge(graphdef, st), x) * probe)

    ours = objective(lambda m, x: m(x, cos, sin, seg, None, "dense")[0])
    ref = objective(lambda m, x: reference(m, x, cos, sin, seg))
    want = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(state, x)
    # One device; 4 context shards of 22 queries (blocks of 16, padded); heads split over 2 tensor shards.
    for layout in (None, {"context": 4, "data": 2}, {"context": 2, "tensor": 2, "data": 2}):
        par = layout and Parallelism.create(ParallelConfig(mesh=layout))
        args = (state, x) if layout is None else (state, jax.device_put(x, par.sharding(("batch", "length"))))
        with use(par) if layout is not None else contextlib.nullcontext():
            got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(*args)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_key_block_range_is_the_visible_blocks():
    """Per query block, [first, last] are exactly the key blocks holding a visible key (brute force), so the
    loop skips blocks above the diagonal and before the documents; padding (row < 0) sees nothing."""
    block, seg = 16, segments_of(96)
    first_rows = flash.document_starts(seg)
    rows = np.arange(96)
    for r in range(B):
        ok = np.asarray(visible(rows[:, None], rows[None, :], seg[r][:, None], seg[r][None, :]))
        for i in range(6):
            q = slice(i * block, (i + 1) * block)
            lo, hi = (int(v) for v in flash.key_block_range(jnp.asarray(rows[q]), first_rows[r, q], block))
            seen = np.flatnonzero(ok[q].any(axis=0)) // block
            assert (lo, hi) == (seen.min(), seen.max()), (r, i)
    lo, hi = flash.key_block_range(jnp.asarray([40, 41, -1, -1]), jnp.asarray([37, 37, 0, 0]), 16)
    assert (int(lo), int(hi)) == (2, 2)  # the zero padding of a last block does not pull `first` to 0
    lo, hi = flash.key_block_range(jnp.full((4,), -1), jnp.zeros((4,), jnp.int32), 16)
    assert int(lo) > int(hi)
    # Row 0 (documents at 0, 37, 70): 13 of the 21 causal key blocks computed (36 in all).
    ranges = [flash.key_block_range(jnp.asarray(rows[q]), first_rows[0, q], block)
              for q in (slice(i * block, (i + 1) * block) for i in range(6))]
    assert [int(hi) - int(lo) + 1 for lo, hi in ranges] == [1, 2, 3, 2, 3, 2]


def test_dense_mode_runs_no_indexer(cfg):
    model = GLM5(cfg, rngs=nnx.Rngs(0))
    ids = jnp.ones((B, L), jnp.int32)
    for mode, present in (("dense", False), ("sparse", True)):
        hlo = jax.jit(lambda i: model(i, dsa_mode=mode).logits).lower(ids).as_text(debug_info=True)
        assert (scopes.INDEXER in hlo) == present, mode


def test_dense_step_leaves_the_indexer_bitwise(cfg):
    """A dense-mode step with `trainable: no_indexer` keeps every indexer parameter at its initialisation
    (no gradient, no weight decay), so the DSA warm-up starts the indexer from a fresh initialisation."""
    state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
    batch = microbatches(two_document_batch(cfg.vocab_size, 2, 40), 1)
    step = train_step(cfg, 2, 40, loss_cfg=LS.LossConfig(dsa="dense"), trainable="no_indexer",
                      opt={"matrix_optimizer": "adamw", "weight_decay": 0.1})
    params = jax.device_put(jax.device_get(flatten(state.params)), step.param_shardings)
    buffers = jax.device_put(jax.device_get(flatten(state.buffers)), step.buffer_shardings)
    before = jax.device_get(params)
    new, *_ = step(params, buffers, step.init_optimizer(params), batch, 1, 1e-2, 0.0)
    new = jax.device_get(new)
    indexer = [k for k in before if ".indexer." in k]
    assert indexer and all(np.array_equal(new[k], before[k]) for k in indexer)
    assert any(not np.array_equal(new[k], before[k]) for k in before if ".indexer." not in k)


def test_splash_kernel_equals_blocked(monkeypatch):
    """JAX's TPU splash kernel in Pallas interpret mode (on this CPU) against the blocked path, forward and
    every gradient: 2 heads of 64 + 64 / 128 (the kernel's 128-wide lanes), 1,024 tokens (two 512-wide tiles),
    3 documents a row; on one device and with the heads split over 2 devices."""
    cfg = config.load("tiny", ["qk_nope_head_dim=64", "qk_rope_head_dim=64", "v_head_dim=128", "num_attention_heads=2",
                               "num_key_value_heads=2", "attention_query_block=128",
                               "index_head_dim=64"])
    length = 1024
    layer = MLA(cfg, has_indexer=False, stack=None, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(layer)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, length, cfg.hidden_size)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((1, length, cfg.hidden_size)), jnp.float32)
    seg = jnp.asarray(np.repeat([1, 2, 3], [400, 360, 264])[None].astype(np.int32))
    cos, sin = rope(cfg, positions_of(seg))
    loss = lambda st, x: jnp.sum(nnx.merge(graphdef, st)(x, cos, sin, seg, None, "dense")[0] * probe)
    blocked = jax.value_and_grad(loss, argnums=(0, 1))(state, x)
    assert flash.dense_kernel("tpu", 1, length, (cfg.qk_head_dim, cfg.v_head_dim)) == "splash"
    monkeypatch.setattr(mla_module, "platform", lambda: "tpu")
    monkeypatch.setattr(flash, "splash", functools.partial(flash.splash, interpret=True))
    splash = jax.value_and_grad(loss, argnums=(0, 1))(state, x)
    par = Parallelism.create(ParallelConfig(mesh={"tensor": 2}), jax.devices()[:2])  # heads split: per device
    with use(par):
        sharded = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
    for got in (splash, sharded):
        np.testing.assert_allclose(got[0], blocked[0], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(blocked[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_dense_kernel_selection():
    assert flash.dense_kernel("tpu", 1, 4096, (256, 256)) == "splash"
    assert flash.dense_kernel("tpu", 2, 4096, (256, 256)) == "blocked"  # context shards: offsets per device
    assert flash.dense_kernel("tpu", 1, 4096 + 128, (256, 256)) == "blocked"  # not whole 512-wide tiles
    assert flash.dense_kernel("tpu", 1, 4096, (32, 16)) == "blocked"
    assert flash.dense_kernel("cpu", 1, 4096, (256, 256)) == "blocked"
