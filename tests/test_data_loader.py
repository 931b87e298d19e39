"""Data pipeline: batch contract, exact resume through Orbax (mid-stage and across a stage switch), coverage,
per-process shards, stage schedule, global batch assembly."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from glm5_jax.data import config as data_config
from glm5_jax.data.loader import (
    DataPipeline,
    batch_sharding,
    global_batch,
    restore_args,
    save_args,
)
from glm5_jax.data.packing import IGNORE, KEYS
from glm5_jax.data.tokenizer import ByteTokenizer
from glm5_jax.errors import ConfigError, DataError

TOK = ByteTokenizer()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct documents of 10..60 bytes, each starting with its own id."""
    rng = np.random.default_rng(seed)
    return [f"doc{i:04d} " + "".join(rng.choice(list("abcdefgh \n"), rng.integers(1, 52))) for i in range(n)]


def write_jsonl(path, docs):
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return str(path)


def two_stage_config(paths, **extra) -> data_config.DataConfig:
    return data_config.from_dict({
        "sources": {"corpus": {"kind": "jsonl", "paths": paths}},
        "stages": [
            {"name": "short", "seq_len": 32, "tokens_per_step": 128, "tokens": 128 * 20, "mixture": {"corpus": 1}},
            {"name": "long", "seq_len": 64, "tokens_per_step": 128, "tokens": 128 * 10, "mixture": {"corpus": 1},
             "rope": {"rope_theta": 1e6}},
        ],
        "seed": 3, **extra,
    })


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(60)
    paths = [write_jsonl(tmp_path / "a.jsonl", docs[:25]), write_jsonl(tmp_path / "b.jsonl", docs[25:])]
    return docs, paths


def take(it, n):
    return [next(it) for _ in range(n)]


def stream_docs(batches) -> list[str]:
    """Documents in stream order: rows laid end to end (concat-then-split keeps order), cut at EOS."""
    ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for batch in batches for b in [batch]])
    cuts = np.flatnonzero(ids == TOK.eos_id)
    return [TOK.decode(ids[s + 1 if i else 0:e]) for i, (s, e) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"step {i} {k}")


def test_batch_contract(corpus):
    _, paths = corpus
    pipe = DataPipeline(two_stage_config(paths), 0, 1)
    for b in take(pipe.iterator(), 3):
        assert set(b) == set(KEYS)
        assert all(v.dtype == np.int32 and v.shape == (4, 32) for v in b.values())
        ids, seg, pos, tgt = b["input_ids"], b["segment_ids"], b["positions"], b["targets"]
        for r in range(4):
            starts = np.flatnonzero(np.r_[True, seg[r, 1:] != seg[r, :-1]])
            assert seg[r, 0] == 1 and np.all(np.diff(seg[r]) >= 0)  # pieces numbered 1, 2, ... in order
            for s, e in zip(starts, np.r_[starts[1:], 32]):
                np.testing.assert_array_equal(pos[r, s:e], np.arange(e - s))  # restart per document
                np.testing.assert_array_equal(tgt[r, s:e - 1], ids[r, s + 1:e])  # next token, same document
                assert tgt[r, e - 1] == IGNORE  # never across documents
        assert np.all(ids[tgt == IGNORE][:-1] >= 0)


@pytest.mark.parametrize("stop", [7, 20, 23], ids=["mid-stage", "at-switch", "after-switch"])
def test_resume_through_orbax_is_exact(corpus, tmp_path, stop):
    _, paths = corpus
    cfg = two_stage_config(paths)
    total = 26  # stage 'short' is steps 0..19, 'long' 20..29
    reference = take(DataPipeline(cfg, 0, 1).iterator(), total)

    it = DataPipeline(cfg, 0, 1).iterator()
    first = take(it, stop)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(stop, args=ocp.args.Composite(data=save_args(it), meta=ocp.args.JsonSave({"step": stop})))
    next(it)  # moving on after save must not change what was saved
    mngr.wait_until_finished()
    it.close()

    resumed = DataPipeline(cfg, 0, 1).iterator()  # a fresh process: new pipeline, iterator at step 0
    restored = mngr.restore(stop, args=ocp.args.Composite(data=restore_args(resumed),
                                                          meta=ocp.args.JsonRestore()))
    assert restored.meta["step"] == stop and resumed.step == stop
    assert_same_batches(first + take(resumed, total - stop), reference)


def test_each_document_once_per_epoch(corpus):
    docs, paths = corpus
    batches = take(DataPipeline(two_stage_config(paths), 0, 1).iterator(), 20)
    seen = stream_docs(batches)
    assert sorted(seen[:len(docs)]) == sorted(docs)  # the first epoch: every document exactly once
    assert seen[:len(docs)] != docs  # shuffled
    assert len(seen) > len(docs) and seen[len(docs):2 * len(docs)] != seen[:len(docs)]  # next epoch reshuffled


def test_two_processes_read_disjoint_shards(corpus):
    docs, paths = corpus
    cfg = two_stage_config(paths)
    per_process = []
    for index in range(2):
        it = DataPipeline(cfg, index, 2).iterator()
        batches = take(it, 20)
        assert batches[0]["input_ids"].shape == (2, 32)  # global batch 4 split over 2 processes
        per_process.append(stream_docs(batches)[:len(docs) // 2])
    a, b = (set(p) for p in per_process)
    assert len(a) == len(b) == len(docs) // 2
    assert not a & b and a | b == set(docs)


def test_deterministic_and_seeded(corpus):
    _, paths = corpus
    a = take(DataPipeline(two_stage_config(paths), 0, 1).iterator(), 4)
    b = take(DataPipeline(two_stage_config(paths), 0, 1).iterator(), 4)
    c = take(DataPipeline(two_stage_config(paths), 0, 1, seed=4).iterator(), 4)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


def test_stage_schedule(corpus):
    _, paths = corpus
    pipe = DataPipeline(two_stage_config(paths), 0, 1)
    assert [pipe.stage_at(s).name for s in (0, 19, 20, 29, 500)] == ["short", "short", "long", "long", "long"]
    assert pipe.stage_at(20).model_overrides() == {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert pipe.stage_at(0).model_overrides() == {}
    it = pipe.iterator(start_step=19)
    shapes = [next(it)["input_ids"].shape for _ in range(3)]
    assert shapes == [(4, 32), (2, 64), (2, 64)]  # tokens per step constant: 4 x 32 = 2 x 64
    assert it.stage.name == "long" and it.step == 22
    assert_same_batches(take(pipe.iterator(start_step=22), 2), take(pipe.iterator(start_step=20), 4)[2:])


def test_stage_batch_must_divide(corpus):
    _, paths = corpus
    with pytest.raises(ConfigError, match=r"stages\.0\.tokens_per_step: must be a multiple of seq_len \(32\)"):
        two_stage_config(paths, stages=[{"name": "s", "seq_len": 32, "tokens_per_step": 100, "tokens": 1000,
                                         "mixture": {"corpus": 1}}])
    with pytest.raises(ConfigError, match="divide evenly over 3 processes"):
        DataPipeline(two_stage_config(paths), 0, 3)


def test_mixture_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"A{i}" for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"B{i}" for i in range(50)])
    cfg = data_config.from_dict({
        "sources": {"a": {"kind": "jsonl", "paths": [a]}, "b": {"kind": "jsonl", "paths": [b]}},
        "stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 256, "tokens": 2560,
                    "mixture": {"a": 3, "b": 1}}]})
    docs = stream_docs(take(DataPipeline(cfg, 0, 1).iterator(), 8))[:80]
    share = sum(d.startswith("A") for d in docs) / len(docs)
    assert 0.7 <= share <= 0.8


def test_global_batch_assembly(corpus):
    _, paths = corpus
    batch = take(DataPipeline(two_stage_config(paths), 0, 1).iterator(), 1)[0]
    n = 4 if len(jax.devices()) >= 4 else 1
    mesh = jax.make_mesh((n, 1), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:n])
    sharding = batch_sharding(mesh)
    assert sharding.spec == jax.sharding.PartitionSpec(("data",), None)
    out = global_batch(batch, sharding)
    assert set(out) == set(KEYS)
    for k in KEYS:
        assert out[k].sharding == sharding and out[k].shape == batch[k].shape
        np.testing.assert_array_equal(np.asarray(out[k]), batch[k])


def test_worker_processes(corpus, tmp_path):
    """mp_prefetch workers: the same batches as in-process reading, exact resume, and a bad record raised in a
    worker arrives in the trainer's process as the same one-line DataError."""
    _, paths = corpus
    reference = take(DataPipeline(two_stage_config(paths), 0, 1).iterator(), 6)
    it = DataPipeline(two_stage_config(paths, num_workers=1), 0, 1).iterator()
    got = take(it, 3)
    state = it.get_state()
    it.close()
    resumed = DataPipeline(two_stage_config(paths, num_workers=1), 0, 1).iterator()
    resumed.set_state(json.loads(json.dumps(state)))
    got += take(resumed, 3)
    resumed.close()
    assert_same_batches(got, reference)

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff"}\n')
    it = DataPipeline(two_stage_config([str(bad)], num_workers=1, on_error="raise"), 0, 1).iterator()
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8 at byte 14"):
        take(it, 5)
    it.close()
