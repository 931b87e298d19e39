"""Data sources (JSONL, Parquet, ArrayRecord text and tokens, stdlib), tokenizers, bad input, config errors."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from glm5_jax.data import config as data_config
from glm5_jax.data import errors
from glm5_jax.data.corpus import stdlib_files
from glm5_jax.data.loader import DataPipeline
from glm5_jax.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
from glm5_jax.errors import ConfigError, DataError

TOK = ByteTokenizer()
DOCS = [f"document number {i}: " + "xyz" * i for i in range(12)]


def config(source: dict, on_error="skip", tokenizer=None, seq_len=64):
    return data_config.from_dict({
        "tokenizer": tokenizer or {"kind": "bytes"},
        "sources": {"src": source},
        "stages": [{"name": "s", "seq_len": seq_len, "tokens_per_step": 2 * seq_len, "tokens": 100 * seq_len,
                    "mixture": {"src": 1}}],
        "on_error": on_error, "shuffle": False})


def first_epoch(cfg, n_docs, tok=TOK) -> list[str]:
    """Documents of the first epoch, in order (shuffle off), decoded from packed batches."""
    it = DataPipeline(cfg, 0, 1).iterator()
    ids = []
    while sum(np.count_nonzero(np.asarray(i) == tok.eos_id) for i in ids) < n_docs:
        b = next(it)
        ids.append(b["input_ids"][b["segment_ids"] > 0])
    ids = np.concatenate(ids)
    cuts = np.flatnonzero(ids == tok.eos_id)[:n_docs]
    return [tok.decode(ids[s + 1:e]) for s, e in zip(np.r_[-1, cuts[:-1]], cuts)]


def write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def write_arrayrecord(path, records: list[bytes]):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()
    return str(path)


def write_parquet(path, docs, row_group_size=5):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), str(path), row_group_size=row_group_size)
    return str(path)


def test_jsonl_globs_and_text_field(tmp_path):
    for k, part in enumerate((DOCS[:5], DOCS[5:])):
        write_jsonl(tmp_path / f"part{k}.jsonl", [json.dumps({"body": d, "n": 1}).encode() for d in part])
    cfg = config({"kind": "jsonl", "paths": [str(tmp_path / "part*.jsonl")], "text_field": "body"})
    assert first_epoch(cfg, len(DOCS)) == DOCS


def test_parquet(tmp_path):
    cfg = config({"kind": "parquet", "paths": [write_parquet(tmp_path / "d.parquet", DOCS)], "text_field": "body"})
    assert first_epoch(cfg, len(DOCS)) == DOCS


def test_arrayrecord_text_and_tokens(tmp_path):
    text = write_arrayrecord(tmp_path / "t.array_record", [d.encode() for d in DOCS])
    assert first_epoch(config({"kind": "arrayrecord", "paths": [text]}), len(DOCS)) == DOCS
    tokens = write_arrayrecord(tmp_path / "k.array_record", [TOK.encode(d).astype("<i4").tobytes() for d in DOCS])
    assert first_epoch(config({"kind": "tokens", "paths": [tokens]}), len(DOCS)) == DOCS


def test_stdlib_corpus_is_deterministic_code():
    files = stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert not any("site-packages" in f for f in files)
    pipe = DataPipeline(data_config.load("default"), 0, 1)
    batch = next(pipe.iterator())
    assert batch["input_ids"].shape == (32, 128) and pipe.vocab_size <= 512
    assert "def " in "".join(TOK.decode(row) for row in batch["input_ids"]) or "import" in TOK.decode(
        batch["input_ids"].ravel())


def test_hf_tokenizer(tmp_path):
    path = train_bpe(DOCS * 20, 300, str(tmp_path / "tokenizer.json"), eos_token="<eos>")
    tok = HFTokenizer(path, eos_token="<eos>")
    assert tok.decode(tok.encode(DOCS[3])) == DOCS[3]
    src = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": d}).encode() for d in DOCS])
    cfg = config({"kind": "jsonl", "paths": [src]}, tokenizer={"kind": "hf", "path": path, "eos_token": "<eos>"})
    assert first_epoch(cfg, len(DOCS), tok) == DOCS
    with pytest.raises(ConfigError, match="tokenizer.eos_token: '<nope>' is not in"):
        HFTokenizer(path, eos_token="<nope>")


BAD_JSONL = [json.dumps({"text": "good one"}).encode(), b'{"text": "bad \xff byte"}', json.dumps({"text": ""}).encode(),
             b'{"text": ', json.dumps({"other": "x"}).encode(), json.dumps({"text": "good two"}).encode()]


@pytest.mark.parametrize("case", ["jsonl", "missing-file", "parquet", "tokens"])
def test_bad_input_skipped_with_location(tmp_path, caplog, case):
    good = write_jsonl(tmp_path / "good.jsonl", [json.dumps({"text": d}).encode() for d in DOCS])
    if case == "jsonl":
        source, expected = {"kind": "jsonl", "paths": [write_jsonl(tmp_path / "bad.jsonl", BAD_JSONL)]}, [
            "bad.jsonl:2: invalid UTF-8", "bad.jsonl:3: empty document", "bad.jsonl:4: not valid JSON",
            "bad.jsonl:5: no string field 'text'"]
        want_docs = ["good one", "good two"]
    elif case == "missing-file":
        source, expected = {"kind": "jsonl", "paths": [good, str(tmp_path / "gone.jsonl")]}, ["gone.jsonl: no such file"]
        want_docs = DOCS
    elif case == "parquet":
        (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
        ok = write_parquet(tmp_path / "ok.parquet", DOCS)
        source = {"kind": "parquet", "paths": [str(tmp_path / "broken.parquet"), ok], "text_field": "body"}
        expected, want_docs = ["broken.parquet: not a readable Parquet file"], DOCS
    else:
        records = [TOK.encode(d).astype("<i4") for d in DOCS[:3]]
        records[1][2] = 300  # >= the byte tokenizer's vocab of 275
        source = {"kind": "tokens", "paths": [write_arrayrecord(tmp_path / "k.array_record",
                                                                [r.tobytes() for r in records])]}
        expected = ["k.array_record: record 1: token id 300 at offset 2 is outside [0, vocab_size=275)"]
        want_docs = [DOCS[0], DOCS[2]]
    errors.reset_skipped_counts()
    with caplog.at_level(logging.WARNING, logger="glm5_jax.data"):
        assert first_epoch(config(source), len(want_docs)) == want_docs
    log = caplog.text
    for message in expected:
        assert message in log, log
    assert errors.skipped_counts()["src"] >= len(expected)

    # on_error: raise rejects the same input with the same one-line location, from any thread.
    with pytest.raises(DataError, match=re.escape(expected[0])):
        first_epoch(config(source, on_error="raise"), len(want_docs))


def test_source_without_records(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="source src: no records"):
        DataPipeline(config({"kind": "jsonl", "paths": [str(tmp_path / "empty.jsonl")]}), 0, 1)


@pytest.mark.parametrize("values,message", [
    ({"sorces": {}}, "sorces: unknown data config key (did you mean 'sources'?)"),
    ({"sources": {"a": {"kind": "csv", "paths": ["x"]}}}, "sources.a.kind: must be one of stdlib, jsonl, parquet"),
    ({"sources": {"a": {"kind": "jsonl"}}}, "sources.a.paths: kind jsonl needs at least one file or glob"),
    ({"stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 128, "tokens": 1280, "mixture": {"b": 1}}]},
     "stages.0.mixture.b: no such source; sources: a"),
    ({"stages": [{"name": "s", "seq_len": 0, "tokens_per_step": 128, "tokens": 1280, "mixture": {"a": 1}}]},
     "stages.0.seq_len: must be an integer >= 1; got 0"),
    ({"stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 128, "tokens": 1280, "mixture": {"a": 1},
                  "rope": {"rope_type": "yarn"}}]}, "stages.0.rope.rope_type: must be one of default, linear"),
    ({"on_error": "ignore"}, "on_error: must be one of skip, raise; got 'ignore'"),
    ({"tokenizer": {"kind": "hf"}}, "tokenizer.path: kind hf needs the path of a tokenizer.json"),
])
def test_config_errors_name_the_key(values, message):
    base = {"sources": {"a": {"kind": "stdlib"}},
            "stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 128, "tokens": 1280, "mixture": {"a": 1}}]}
    with pytest.raises(ConfigError) as e:
        data_config.from_dict({**base, **values})
    assert str(e.value).startswith(message), str(e.value)


def test_presets_and_overrides():
    cfg = data_config.load("default", ["stages.1.seq_len=512", "seed=7"])
    assert cfg.stages[1].seq_len == 512 and cfg.seed == 7
    glm5 = data_config.load("glm5")
    assert [s.seq_len for s in glm5.stages][:4] == [4096, 4096, 32768, 131072]  # (the 4K ramp is one stage)
    assert max(s.seq_len for s in glm5.stages) == 202752
    with pytest.raises(ConfigError, match="data preset 'nope' does not exist; presets: default, glm5"):
        data_config.load("nope")
    with pytest.raises(ConfigError, match="stages.5.seq_len: '5' is not an index of a list of 2"):
        data_config.load("default", ["stages.5.seq_len=1"])
