"""Packed rows from the pipeline never let attention cross documents, through the tiny model's sparse path."""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from glm5_jax import config
from glm5_jax.data import config as data_config
from glm5_jax.data.loader import DataPipeline
from glm5_jax.model import GLM5


def test_changing_one_document_leaves_the_others_logits(tmp_path):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefghij =()"), int(n))) for n in rng.integers(18, 30, 40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = data_config.from_dict({
        "sources": {"d": {"kind": "jsonl", "paths": [str(tmp_path / "d.jsonl")]}},
        "stages": [{"name": "s", "seq_len": 80, "tokens_per_step": 160, "tokens": 1600, "mixture": {"d": 1}}]})
    batch = next(DataPipeline(cfg, 0, 1).iterator())
    row = {k: v[:1] for k, v in batch.items()}
    seg = row["segment_ids"][0]
    assert seg.max() >= 3  # several documents in the row

    # Two layers (one dense, one MoE) and no MTP: every attention path of the preset, at half the compile time.
    model_cfg = config.load("tiny", ["num_hidden_layers=2", "first_k_dense_replace=1", "num_nextn_predict_layers=0"])
    assert model_cfg.index_topk < seg.size  # longer than index_topk: the sparse top-k path runs
    graphdef, state = nnx.split(GLM5(model_cfg, rngs=nnx.Rngs(0)))
    run = jax.jit(lambda s, ids, pos, sg: nnx.merge(graphdef, s)(ids, pos, sg, mtp_depths=0).logits)
    before = np.asarray(run(state, row["input_ids"], row["positions"], row["segment_ids"]))[0]

    changed = row["input_ids"].copy()
    middle = seg == 2
    changed[0, middle] = rng.integers(3, 259, int(middle.sum()))
    after = np.asarray(run(state, changed, row["positions"], row["segment_ids"]))[0]

    np.testing.assert_allclose(after[~middle], before[~middle], rtol=0, atol=1e-5)
    assert np.abs(after[middle] - before[middle]).max() > 1e-3  # the edit itself is visible
