"""`glm5 data inspect`: report on the embedded corpus; bad configs and data end in one `glm5: error:` line."""

from __future__ import annotations

import numpy as np
import yaml

from tests.conftest import run_cli


def test_inspect_default_corpus(capsys):
    assert run_cli("data", "inspect", "--rows", "2", "--batches", "3", "--stage", "long") == 0
    out = capsys.readouterr().out
    for text in ("stages (1 process)", "short", "stage long: 16 rows x 256 tokens", "row 1 (",
                 "packing efficiency", "tokens/s in this process"):
        assert text in out, out


def test_inspect_errors_are_one_line(tmp_path, capsys):
    assert run_cli("data", "inspect", "--override", "stages.0.seq_len=100") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm5: error: stages.0.tokens_per_step: must be a multiple of seq_len (100)"), err
    assert run_cli("data", "inspect", "--stage", "nope") == 2
    assert "no stage named 'nope'" in capsys.readouterr().err

    cfg = {"sources": {"a": {"kind": "jsonl", "paths": [str(tmp_path / "missing.jsonl")]}}, "on_error": "raise",
           "stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 128, "tokens": 1280, "mixture": {"a": 1}}]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli("data", "inspect", "--config", tmp_path / "data.yaml") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm5: error: source a: ") and "missing.jsonl: no such file" in err and "\n" not in err


def test_inspect_sft_marks_scored_tokens_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.npz"
    assert run_cli("data", "inspect", "--config", "sft", "--rows", "1", "--batches", "1", "--write-rows", "10",
                   "--out", str(out)) == 0
    text = capsys.readouterr().out
    for part in ("stage sft: 8 rows x 512 tokens", "row 0 (", "conversation 1: [gMASK]<sop>", "<|assistant|>⟦",
                 "conversations longer than a row: 0 truncated, 0 dropped", "wrote the first 10 rows of stage sft"):
        assert part in text, text
    rows = np.load(out)
    assert {k: rows[k].shape for k in rows} == {k: (10, 512) for k in ("input_ids", "targets", "positions",
                                                                       "segment_ids", "loss_mask")}
    np.testing.assert_array_equal(rows["loss_mask"], rows["targets"] != -1)
    assert 0 < rows["loss_mask"].mean() < 1

    for args, message in ((("--write-rows", "2"), "--write-rows and --out go together"),
                          (("--write-rows", "2", "--out", str(tmp_path / "no" / "r.npz")), "does not exist"),
                          (("--write-rows", "2", "--out", str(tmp_path)), "must be a file name ending in .npz")):
        assert run_cli("data", "inspect", "--config", "sft", *args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("glm5: error: ") and message in err and "\n" not in err, err
