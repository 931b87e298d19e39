"""Failures a user can cause end in one `glm5: error:` line (exit status 2), promptly, with nothing partial on
disk: unusable data (no endless skip loop), unreadable config files, bad forward / convert input, torn metric
logs, truncated checkpoint arrays, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from glm5_jax.values import apply_overrides
from tests.conftest import build_hf_model, run_cli


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glm5: error: "), err
    return err[0]


def data_config(tmp_path, sources: dict, mixture: dict | None = None, **extra) -> str:
    cfg = {"sources": sources, "shuffle": True, **extra,
           "stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 128, "tokens": 1280,
                       "mixture": mixture or dict.fromkeys(sources, 1)}]}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def write_parquet(path, values):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": values}), str(path))
    return str(path)


# ----- 1. a source with no usable record is one DataError, not an endless loop of skips -----

UNUSABLE = {
    "empty-text": ("jsonl", lambda p: p.write_text('{"text": ""}\n' * 40), "empty document"),
    "no-text-field": ("jsonl", lambda p: p.write_text('{"body": "a document"}\n' * 40), "no string field 'text'"),
    "int-column": ("parquet", lambda p: write_parquet(p, list(range(40))), "column 'text' holds int, not text"),
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_all_bad_source_is_one_error_not_a_hang(case, tmp_path, capsys):
    kind, write, reason = UNUSABLE[case]
    path = tmp_path / f"bad.{kind}"
    write(path)
    cfg = data_config(tmp_path, {"bad": {"kind": kind, "paths": [str(path)]}})
    start = time.monotonic()
    assert run_cli("data", "inspect", "--config", cfg, "--rows", "1", "--batches", "1") == 2
    assert time.monotonic() - start < 30
    err = one_error_line(capsys)
    assert "source bad: no usable record" in err and str(path) in err and reason in err, err


def test_all_bad_mixture_member_in_a_worker_is_one_error(tmp_path, monkeypatch):
    """A bad member next to a good one still ends in one DataError, raised in the main process from a worker
    (as it is where the check of a source's first records when the pipeline is built cannot see it)."""
    from glm5_jax.data import loader
    from glm5_jax.data.loader import DataPipeline

    monkeypatch.setattr(loader, "check_usable", lambda *args: None)
    from glm5_jax.errors import DataError

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 3}) + "\n" for i in range(50)))
    bad = write_parquet(tmp_path / "bad.parquet", list(range(20)))
    cfg = data_config(tmp_path, {"good": {"kind": "jsonl", "paths": [str(good)]},
                                 "bad": {"kind": "parquet", "paths": [bad]}}, num_workers=1)
    it = DataPipeline(cfg, 0, 1).iterator()
    start = time.monotonic()
    try:
        with pytest.raises(DataError, match=r"source bad: no usable record .*bad.parquet: row \d+: column 'text'"):
            for _ in range(500):
                next(it)
    finally:
        it.close()
    assert time.monotonic() - start < 40


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    import logging

    from glm5_jax.data import errors

    errors.reset_skipped_counts()
    policy = errors.ErrorPolicy("skip")
    with caplog.at_level(logging.WARNING, logger="glm5_jax.data"):
        for i in range(200):
            policy.handle("src", errors.Bad(f"f.jsonl:{i}", "empty document"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and "5 so far" in lines[-1] and "at most every" in lines[-1], lines
    assert errors.skipped_counts()["src"] == 200


def test_directory_in_place_of_a_data_file(tmp_path, capsys):
    cfg = data_config(tmp_path, {"a": {"kind": "jsonl", "paths": [str(tmp_path)]}}, on_error="raise")
    assert run_cli("data", "inspect", "--config", cfg) == 2
    assert "is a directory, not a data file" in one_error_line(capsys)


# ----- 2. config files and values -----

CONFIG_FILES = {
    "not-utf8": (lambda d: (d / "r.yaml").write_bytes(b"model: tiny\nrun_dir: caf\xe9\n") and "r.yaml",
                 "r.yaml: not UTF-8 text"),
    "directory": (lambda d: os.makedirs(d / "conf.yaml") or "conf.yaml", "conf.yaml: is a directory"),
    "yaml-date": (lambda d: (d / "r.yaml").write_text("model: tiny\nrun_dir: 2024-01-01\n") and "r.yaml",
                  "run_dir: a date value is not allowed"),
    "missing-path": (lambda d: "nowhere/recipe.yaml", "nowhere/recipe.yaml: no such file"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_unreadable_recipe_file(case, tmp_path, capsys, monkeypatch):
    make, message = CONFIG_FILES[case]
    monkeypatch.chdir(tmp_path)
    name = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert run_cli("train", "--config", name) == 2
    assert message in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == before  # no run dir, nothing else


def test_list_indices_in_every_config_override():
    from glm5_jax import config
    from glm5_jax.data import config as data_config
    from glm5_jax.train import recipe as recipe_lib

    def data_of(recipe):  # as the trainer passes a recipe's data_overrides on
        return data_config.load(recipe.data, [f"{k}={json.dumps(v)}" for k, v in recipe.data_overrides.items()])

    dcfg = data_of(recipe_lib.load("quickstart", ["data_overrides.stages.0.seq_len=64"]))
    base = data_of(recipe_lib.load("quickstart"))
    assert dcfg.stages[0].seq_len == 64 and dcfg.stages[0].mixture == base.stages[0].mixture
    assert dcfg.stages[1:] == base.stages[1:]
    assert data_config.load("default", ["stages.1.seq_len=128"]).stages[1].seq_len == 128
    values = apply_overrides({"a": [{"b": 1}, 2], "d": {"e": 1}}, ["a.0.b=3", "a.1=4", "d.f=5", "d={g: 6}"])
    assert values == {"a": [{"b": 3}, 4], "d": {"g": 6}}  # a mapping still replaces a mapping
    with pytest.raises(config.ConfigError, match="a.2.b: '2' is not an index of a list of 2"):
        apply_overrides(values, ["a.2.b=1"])
    with pytest.raises(config.ConfigError, match="run_dir: a date value is not allowed"):
        apply_overrides({}, ["run_dir=2024-01-01"])


# ----- forward, convert, inspect input -----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from glm5_jax.convert.hf import hf_to_orbax

    root = tmp_path_factory.mktemp("rel")
    build_hf_model(0).save_pretrained(str(root / "hf"))
    hf_to_orbax(str(root / "hf"), str(root / "ckpt"), show_progress=False)
    return root


def forward(root, *extra, ids=None):
    ids_path = root / "ids.npy"
    np.save(ids_path, np.ones((1, 4), np.int32) if ids is None else ids)
    return run_cli("forward", "--checkpoint", root / "ckpt", "--input-ids", ids_path, *extra)


def test_forward_bad_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "logits.npy"
    assert forward(checkpoint, "--output", out, ids=np.zeros((1, 0), np.int32)) == 2
    assert "is empty (shape [1, 0])" in one_error_line(capsys)
    assert forward(checkpoint, "--output", tmp_path / "no" / "logits.npy") == 2
    assert f"folder {tmp_path / 'no'} does not exist" in one_error_line(capsys)
    assert forward(checkpoint, "--output", out, "--override", "hidden_size=32") == 2
    err = one_error_line(capsys)
    assert err.startswith("glm5: error: hidden_size: changes the shapes of the model's parameters "
                          "(embed_tokens would be [160, 32]; in "), err
    text = tmp_path / "ids.txt"
    text.write_text("1 2 3\n")
    assert run_cli("forward", "--checkpoint", checkpoint / "ckpt", "--input-ids", text, "--output", out) == 2
    assert f"--input-ids {text}: not a .npy file; save the ids with numpy.save" in one_error_line(capsys)
    assert os.listdir(tmp_path) == ["ids.txt"]


def test_convert_bad_index_and_shard_size(checkpoint, tmp_path, capsys):
    hf = tmp_path / "hf"
    build_hf_model(1).save_pretrained(str(hf))
    (hf / "model.safetensors.index.json").write_text("{not json")
    capsys.readouterr()  # transformers' progress bar
    assert run_cli("convert", "hf-to-orbax", "--hf-dir", hf, "--out", tmp_path / "o", "-q") == 2
    assert "model.safetensors.index.json: not valid JSON" in one_error_line(capsys)
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", checkpoint / "ckpt", "--out", tmp_path / "o",
                   "--max-shard-size", "0", "-q") == 2
    assert "--max-shard-size: must be at least 1 byte" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_of_truncated_array_names_it(checkpoint, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint / "ckpt", ckpt)
    chunk = ckpt / "0" / "params" / "layers.0.self_attn.q_a_proj" / "0.0.0"
    os.truncate(chunk, os.path.getsize(chunk) // 2)
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf", "-q") == 2
    err = one_error_line(capsys)
    assert "step 0: cannot read array layers.0.self_attn.q_a_proj in " in err and str(chunk) in err, err
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_describe_read_error_of_ocdbt_message():
    from glm5_jax.checkpoint.store import describe_read_error

    exc = ValueError('OUT_OF_RANGE: Error reading "layers.0.self_attn.q_a_proj/0.0.0" in OCDBT database at local '
                     'file "/ck/0/params/": Requested byte range [733970, 756684) is not valid for value of size '
                     '700000 [source locations=\'tensorstore/kvstore/file/file_key_value_store.cc:322\']')
    line = describe_read_error(exc, "/ck/0/params")
    assert line == ("array layers.0.self_attn.q_a_proj in /ck/0/params/: OUT_OF_RANGE: truncated "
                    "(needs bytes up to 756684, the stored value has 700000)"), line


@pytest.mark.parametrize("flag,value,message", [
    ("--rows", "-3", "--rows: must be an integer >= 0; got -3"),
    ("--batches", "0", "--batches: must be an integer >= 1; got 0"),
    ("--chars", "-1", "--chars: must be an integer >= 1; got -1"),
])
def test_inspect_rejects_nonsense_counts(flag, value, message, capsys):
    assert run_cli("data", "inspect", flag, value) == 2
    assert message in one_error_line(capsys)


# ----- 3. torn metrics log -----


def test_metrics_log_drops_torn_line_and_later_steps(tmp_path):
    from glm5_jax.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "stage": "long", "loss": 1.0}) + "\n" for s in range(5, 25, 5))
    path.write_text(whole + '{"step": 19, "stage": "lo')
    MetricsLog(str(tmp_path), 15, False, False, 50).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 15]


# ----- 6. signals stop the other commands at once, exit 128 + signal, nothing written -----


def test_sigterm_stops_data_inspect_with_workers(tmp_path):
    cfg = data_config(tmp_path, {"py": {"kind": "stdlib"}}, num_workers=1)
    proc = subprocess.Popen([sys.executable, "-m", "glm5_jax.cli", "data", "inspect", "--config", cfg,
                             "--batches", "100000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it is reading batches (the row display is printed)
        line = proc.stdout.readline()
        if line.startswith("row 0") or not line:
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "glm5: stopped by SIGTERM" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["data.yaml"]


def test_sigterm_stops_forward_with_nothing_written(checkpoint, tmp_path):
    """Stopped wherever it is (importing, loading, compiling): exit 143 within the grace period, no output.
    (8 x 512 tokens: the command takes seconds more than the 1.5 s before the signal, even on an idle machine.)"""
    ids = tmp_path / "ids.npy"
    np.save(ids, np.ones((8, 512), np.int32))
    proc = subprocess.Popen([sys.executable, "-m", "glm5_jax.cli", "forward", "--checkpoint", checkpoint / "ckpt",
                             "--input-ids", ids, "--output", tmp_path / "logits.npy"], stderr=subprocess.PIPE,
                            text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - start < 10, err
    assert "glm5: stopped by SIGTERM" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["ids.npy"]
