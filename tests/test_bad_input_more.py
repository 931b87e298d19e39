"""Nonsense values, unexpected formats, unusable data and command-line mistakes: each is one `glm5: error:`
line naming the key, flag or file (exit status 2) with nothing written; and what a newcomer meets on the
normal path (full tables when piped, a quiet stdlib corpus, a readable plot)."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glm5: error: "), err
    return err[0]


def fails(capsys, *argv) -> str:
    """Run `glm5 ARGV`; it must exit 2 with one error line, which is returned."""
    assert run_cli(*argv) == 2
    return one_error_line(capsys)


def data_config(tmp_path, sources: dict, mixture: dict | None = None) -> str:
    cfg = {"sources": sources, "stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 128, "tokens": 1280,
                                           "mixture": mixture or dict.fromkeys(sources, 1)}]}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def write_metrics(run_dir, records) -> None:
    os.makedirs(run_dir, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# ----- 5. nonsense values -----

@pytest.mark.parametrize("argv,message", [
    (("data", "inspect", "--override", "stages.0.mixture.stdlib=.nan"),
     "stages.0.mixture.stdlib: weight must be a positive finite number; got nan"),
    (("data", "inspect", "--override", "stages.1.mixture.stdlib=.inf"),
     "stages.1.mixture.stdlib: weight must be a positive finite number; got inf"),
    (("data", "inspect", "--override", "stages.1.rope.rope_theta=.nan"),
     "stages.1.rope.rope_theta: must be a positive"),
    (("optimizer", "--config", "tiny", "--override", "rope_parameters.rope_theta=.inf"),
     "rope_parameters.rope_theta: must be a positive number; got inf"),
    (("optimizer", "--config", "tiny", "--override", "rms_norm_eps=.nan"), "rms_norm_eps: must be a finite number"),
    (("launch", "local", "--processes", "2", "--port", "99999", "--", "data", "inspect"),
     "--port: must be a TCP port, 1 to 65535; got 99999"),
])
def test_nonsense_values(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in fails(capsys, *argv)
    assert os.listdir(tmp_path) == []


def test_directory_keys_pointing_at_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").write_text("a file")
    err = fails(capsys, "train", "--config", "quickstart", "compilation_cache=cache")
    assert "compilation_cache: cache is a file, not a directory" in err, err
    err = fails(capsys, "train", "--config", "quickstart", "run_dir=cache")
    assert "run_dir: cache is a file, not a directory" in err, err
    assert os.listdir(tmp_path) == ["cache"]


@pytest.mark.parametrize("record,message", [
    ({"step": 1, "stage": "s", "loss": "low"}, "metrics.jsonl: line 2: loss: must be a number; got 'low'"),
    ({"step": 1, "stage": "s", "loss": 1.0, "tokens_per_s": "fast"}, "line 2: tokens_per_s: must be a number"),
    ({"step": 1, "stage": 3, "loss": 1.0}, "line 2: stage: must be a stage name; got 3"),
])
def test_plot_rejects_non_numbers(record, message, tmp_path, capsys):
    write_metrics(tmp_path, [{"step": 0, "stage": "s", "loss": 2.0}, record])
    assert message in fails(capsys, "plot", tmp_path)
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


# ----- 6. formats the readers do not expect -----

@pytest.mark.parametrize("arrays,flag,message", [
    ({"ids": np.ones((1, 4), np.int32)}, "--input-ids", "a .npz archive (of ids), not a .npy file"),
    ({"a": np.ones(2), "b": np.ones(2)}, "--input-ids", "a .npz archive (of a, b), not a .npy file"),
    ({"pos": np.ones((1, 4), np.int32)}, "--positions", "a .npz archive (of pos), not a .npy file"),
])
def test_npz_where_npy_goes(arrays, flag, message, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", **arrays)
    np.save(tmp_path / "ids.npy", np.ones((1, 4), np.int32))
    ids, positions = ("x.npz", "ids.npy") if flag == "--input-ids" else ("ids.npy", "x.npz")
    err = fails(capsys, "forward", "--checkpoint", tmp_path / "ckpt", "--input-ids", tmp_path / ids, "--positions",
                tmp_path / positions, "--output", tmp_path / "out.npy")
    assert f"{flag} {tmp_path / 'x.npz'}: {message}" in err, err
    assert sorted(os.listdir(tmp_path)) == ["ids.npy", "x.npz"]


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "config.json: must hold a JSON object of keys and values; got a list"),
    ('"glm"', "config.json: must hold a JSON object of keys and values; got a str"),
    ("{nope", "config.json: not valid JSON (line 1"),
])
def test_config_json_that_is_no_mapping(content, message, tmp_path, capsys):
    (tmp_path / "config.json").write_text(content)
    assert message in fails(capsys, "optimizer", "--config", tmp_path / "config.json")
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize("prompts,message", [
    (["caf\udce9"], "--prompt: prompt 0 is not valid UTF-8 text (at character 3)"),
    (["fine", "\udcff\udcfe"], "--prompt: prompt 1 is not valid UTF-8 text (at character 0)"),
    (["a", "b", "ok \udc80"], "--prompt: prompt 2 is not valid UTF-8 text (at character 3)"),
])
def test_prompt_with_invalid_utf8(prompts, message, tmp_path, capsys):
    argv = [a for p in prompts for a in ("--prompt", p)]
    err = fails(capsys, "generate", "--checkpoint", tmp_path / "ckpt", *argv, "--tokenizer", "bytes",
                "--output", tmp_path / "out.npy")
    assert message in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("record,message", [
    ({"stage": "s", "loss": 1.0}, "line 1: step: need an integer step in every record; got None"),
    ({"step": "5", "loss": 1.0}, "line 1: step: need an integer step in every record; got '5'"),
    ({"step": 2.5, "loss": 1.0}, "line 1: step: need an integer step in every record; got 2.5"),
])
def test_metrics_records_without_step(record, message, tmp_path, capsys):
    write_metrics(tmp_path, [record])
    assert message in fails(capsys, "plot", tmp_path, "--out", tmp_path / "c.png")
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


# ----- 7. data errors before the compile, without noise -----

UNUSABLE = {
    "empty-text": ('{"text": "  "}\n' * 30, "no usable record in its 30 records", "bad.jsonl:1: empty document"),
    "no-field": ('{"body": "x"}\n' * 30, "no usable record in its 30 records", "bad.jsonl:1: no string field 'text'"),
    "not-json": ("{\n" * 30, "no usable record in its 30 records", "bad.jsonl:1: not valid JSON"),
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_unusable_source_found_when_the_pipeline_is_built(case, tmp_path, capsys, caplog):
    from glm5_jax.data import errors

    text, count, first = UNUSABLE[case]
    (tmp_path / "bad.jsonl").write_text(text)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a document"}) + "\n")
    cfg = data_config(tmp_path, {"good": {"kind": "jsonl", "paths": [str(good)]},
                                 "bad": {"kind": "jsonl", "paths": [str(tmp_path / "bad.jsonl")]}})
    errors.reset_skipped_counts()
    with caplog.at_level(logging.WARNING):
        err = fails(capsys, "data", "inspect", "--config", cfg, "--rows", "0", "--batches", "1")
    assert f"source bad: {count}, so nothing to train on (first: {tmp_path}/{first}" in err, err
    assert not caplog.records, caplog.text  # no WARNING per skipped record in front of the error
    assert errors.skipped_counts() == {}


def test_unusable_source_stops_train_before_the_compile(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n' * 20)
    cfg = data_config(tmp_path, {"bad": {"kind": "jsonl", "paths": ["bad.jsonl"]}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": "tiny", "data": cfg, "run_dir": "run", "stages": [
        {"name": "s", "steps": 2, "schedule": {"schedule": "constant", "learning_rate": 0.001}}]}))
    start = time.monotonic()
    err = fails(capsys, "train", "--config", "r.yaml", "data_overrides={stages.0.tokens_per_step: 512}")
    assert "source bad: no usable record in its 20 records" in err, err
    assert time.monotonic() - start < 60
    assert "compiling" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "data.yaml", "r.yaml"]


@pytest.mark.parametrize("paths,message", [
    (["{d}/*.json"], "source a: {d}/*.json: pattern matches no files"),
    (["{d}/good.jsonl", "{d}/shard-[0-9].jsonl"], "source a: {d}/shard-[0-9].jsonl: pattern matches no files"),
    (["{d}"], "source a: {d}: is a directory, not a data file"),
])
def test_glob_matching_nothing_is_an_error(paths, message, tmp_path, capsys):
    data = tmp_path / "in"
    data.mkdir()
    (data / "good.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    cfg = data_config(tmp_path, {"a": {"kind": "jsonl", "paths": [p.format(d=data) for p in paths]}})
    assert message.format(d=data) in fails(capsys, "data", "inspect", "--config", cfg)
    assert sorted(os.listdir(tmp_path)) == ["data.yaml", "in"]


# ----- 8. command-line errors are one line -----

@pytest.mark.parametrize("argv,message", [
    (("generate", "--prompt", "hi"), "the following arguments are required: --checkpoint (see glm5 generate --help)"),
    (("launch", "local", "--processes", "two"), "--processes: invalid int value: 'two' (see glm5 launch local --help)"),
    (("trian",), "command: invalid choice: 'trian'"),
    (("data", "inspect", "--nope"), "unrecognized arguments: --nope"),
    (("bench", "--config", "quickstart", "--disk-bytes", "lots"),
     "--disk-bytes: expected a size such as 80GB, 80GiB or 512MB; got 'lots'"),
    (("optimizer", "--config", "tiny", "--override", "rope_parameters=5"),
     "rope_parameters: must be a mapping like {rope_type: default, rope_theta: 1000000.0}; got 5"),
])
def test_command_line_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = fails(capsys, *argv)
    assert message in err and "usage:" not in err, err
    assert os.listdir(tmp_path) == []


# ----- 9. what a newcomer stumbles on -----

def test_eval_of_an_hf_directory_says_what_to_do(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for command in (("eval", "--data", "default"), ("generate", "--prompt-ids", tmp_path / "x.npy"),
                    ("convert", "orbax-to-hf", "--out", tmp_path / "o", "-q")):
        err = fails(capsys, *command, "--checkpoint", hf)
        assert (f"{hf}: a Hugging Face model directory, not an Orbax checkpoint; convert it first: glm5 convert "
                f"hf-to-orbax --hf-dir {hf} --out CKPT") in err, err
    assert os.listdir(tmp_path) == ["hf"] and os.listdir(hf) == ["config.json"]


def test_inspect_table_is_whole_when_piped(capsys):
    assert run_cli("data", "inspect", "--rows", "1", "--batches", "1", "--chars", "40") == 0
    out = capsys.readouterr().out
    for column in ("tok/step", "per proc", "from step", "stdlib:1"):
        assert column in out, out
    assert "…" not in out


def test_stdlib_files_in_other_encodings_are_skipped_quietly_with_the_same_batches(tmp_path, monkeypatch, caplog):
    """The corpus's non-UTF-8 files read as no document: no warning, and the batches are those of skipping
    them as bad records (the quickstart's data is unchanged)."""
    from glm5_jax.data import corpus, errors, sources
    from glm5_jax.data.loader import DataPipeline

    every = corpus.stdlib_files()
    legacy = [i for i, f in enumerate(every) if sources.StdlibSource("s", [f])[0] is None]
    assert any(every[i].endswith("module_koi8_r.py") for i in legacy)
    files = sorted({every[j] for i in legacy for j in range(max(0, i - 2), i + 3)})
    monkeypatch.setattr(sources, "stdlib_files", lambda: files)
    cfg = data_config(tmp_path, {"py": {"kind": "stdlib"}})

    def batches():
        errors.reset_skipped_counts()
        it = DataPipeline(cfg, 0, 1).iterator()
        out = [next(it)["input_ids"] for _ in range(12)]
        it.close()
        return out

    with caplog.at_level(logging.WARNING):
        quiet = batches()
    assert not caplog.records, caplog.text
    decode = sources.StdlibSource.__getitem__
    monkeypatch.setattr(sources.StdlibSource, "__getitem__", lambda self, i: decode(self, i) or sources.Bad(
        self.files[i], "invalid UTF-8"))  # as it read before: a bad record, skipped with a warning
    with caplog.at_level(logging.WARNING):
        skipped = batches()
    assert "invalid UTF-8" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(quiet, skipped))


def test_plot_names_stages_marks_resumes_and_has_a_short_title(tmp_path, monkeypatch):
    from glm5_jax.train import plot

    run = tmp_path / "runs" / "quick"
    write_metrics(run, [{"step": s, "stage": "short" if s < 6 else "long", "loss": 5.0 - s / 4, "tokens_per_s": 900.0,
                         **({"resumed_from": 3} if s == 4 else {})} for s in range(1, 9)])
    monkeypatch.chdir(tmp_path)
    assert plot.title(run) == os.path.join("runs", "quick")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert plot.title(run) == os.path.join("runs", "quick")
    texts = []
    import matplotlib.axes

    real = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, **kw: texts.append(s) or real(
        self, x, y, s, **kw))
    out = plot.plot(str(run))
    assert os.path.getsize(out) > 0 and sorted(os.listdir(run)) == ["curves.png", "metrics.jsonl"]
    assert [t.strip() for t in texts] == ["short", "resumed at 3", "long"], texts
