"""Packed rows: documents in one row with segment ids and restarting positions never see each other."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from glm5_jax import config
from glm5_jax.model import GLM5


@pytest.mark.parametrize("lengths,topk", [((21, 26), 16), ((5, 7, 4), 16)], ids=["sparse", "dense"])
def test_packed_documents_equal_documents_alone(lengths, topk):
    cfg = config.load("tiny", [f"index_topk={topk}"])
    model = GLM5(cfg, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, ids, pos, seg: nnx.merge(graphdef, s)(ids, pos, seg, mtp_depths=0).logits)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    ids = np.concatenate(docs)[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    packed = np.asarray(run(state, ids, positions, segments))[0]
    start = 0
    for doc in docs:
        alone = np.asarray(run(state, doc[None], np.arange(len(doc))[None], np.ones((1, len(doc)), int)))[0]
        np.testing.assert_allclose(packed[start:start + len(doc)], alone, rtol=0, atol=1e-5)
        start += len(doc)
    # the same row without segment ids mixes documents: the test can tell the difference
    mixed = np.asarray(run(state, ids, positions, np.ones_like(segments)))[0]
    assert np.abs(mixed[lengths[0]:] - packed[lengths[0]:]).max() > 1e-4
