"""Wrong input never gives a wrong answer, and an output that cannot be written ends in one line: token ids checked
before their cast, model files that state their sizes, one memory check before anything is allocated, outputs
checked before the work (read-only, full, missing folder, a folder in a file's place), a disk that fills midway
(nothing partial left), and a training run whose checkpoint save fails (the committed step intact, resume exact).

Read-only and full file systems are tmpfs mounts, made where the tests run as root (skipped, saying so, elsewhere).
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from tests import train_util as T
from tests.conftest import run_cli


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glm5: error: "), err
    return err[0]


@pytest.fixture
def mount(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` (e.g. "512k") under tmp_path; unmounted at teardown."""
    made = []

    def make(size: str, name: str = "mnt"):
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        made.append(point)
        return point

    yield make
    for point in reversed(made):
        subprocess.run(["umount", "-l", str(point)], check=False)


def read_only(point):
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
    return point


def fill(point):
    """Fill the file system of `point` to the last byte."""
    with open(point / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return point


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "ckpt"
    assert run_cli("init", "--config", "tiny", "--out", out) == 0
    return out


# ----- 1. ids are checked before any cast: no wrong token, no wrong answer -----

IDS = {
    "uint64-past-int32": ("--input-ids", np.array([[1, 2**63 + 5]], np.uint64),
                          "values [1, 9223372036854775813] (uint64) lie outside int32"),
    "int64-wraps-to-5": ("--input-ids", np.array([[2**32 + 5]], np.int64), "values [4294967301, 4294967301] (int64)"),
    "float-ids": ("--input-ids", np.array([[1.0, 5.0]], np.float32), "need a 2-D integer array [batch, seq]; got float32"),
    "negative-position": ("--positions", np.array([[0, -1]], np.int32), "values must be >= 0; got -1"),
}


@pytest.mark.parametrize("case", IDS)
def test_forward_ids_checked_before_the_cast(case, ckpt, tmp_path, capsys):
    flag, array, message = IDS[case]
    ids, other = tmp_path / "ids.npy", tmp_path / "other.npy"
    np.save(ids, np.ones((1, 2), np.int32))
    np.save(other, array)
    files = {"--input-ids": ids, flag: other}
    args = [a for f, path in files.items() for a in (f, path)]
    assert run_cli("forward", "--checkpoint", ckpt, *args, "--output", tmp_path / "logits.npy") == 2
    assert message in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["ids.npy", "other.npy"]


def test_generate_prompt_ids_past_int32(ckpt, tmp_path, capsys):
    ids = tmp_path / "prompt.npy"
    np.save(ids, np.array([2**63 + 5, 7], np.uint64))
    assert run_cli("generate", "--checkpoint", ckpt, "--prompt-ids", ids, "--max-new-tokens", "2",
                   "--output", tmp_path / "out.npy") == 2
    assert "lie outside int32" in one_error_line(capsys)
    assert os.listdir(tmp_path) == ["prompt.npy"]


# ----- 2. a model file states its sizes; nothing is allocated that does not fit -----

MODEL_FILES = {
    "empty": ("", "names the preset it starts from (preset: tiny, say) or sets its sizes; missing vocab_size, "),
    "one-size": ("hidden_size: 64\n", "missing vocab_size, intermediate_size,"),
    "preset-loop": ("preset: {self}\n", "preset: must name another model preset or YAML file"),
}


@pytest.mark.parametrize("case", MODEL_FILES)
def test_model_file_states_its_sizes(case, tmp_path, capsys):
    text, message = MODEL_FILES[case]
    path = tmp_path / "model.yaml"
    path.write_text(text.format(self=path))
    assert run_cli("init", "--config", path, "--out", tmp_path / "ck") == 2
    assert message in one_error_line(capsys)
    assert os.listdir(tmp_path) == ["model.yaml"]


def test_model_file_from_a_preset(tmp_path):
    from glm5_jax import config

    path = tmp_path / "model.yaml"
    path.write_text("preset: tiny\nnum_hidden_layers: 3\n")
    assert config.load(str(path)) == config.load("tiny", ["num_hidden_layers=3"])


def test_too_big_for_memory_is_refused_before_allocating(ckpt, tmp_path, capsys, monkeypatch):
    import psutil

    assert run_cli("init", "--config", "glm5-744b", "--out", tmp_path / "big") == 2
    assert "init: the model's parameters need 2.7 TiB of host memory; " in one_error_line(capsys)
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=100_000))
    ids = tmp_path / "ids.npy"
    np.save(ids, np.ones((1, 4), np.int32))
    assert run_cli("forward", "--checkpoint", ckpt, "--input-ids", ids, "--output", tmp_path / "l.npy") == 2
    assert f"{ckpt} step 0: the model's parameters need 1.6 MiB of host memory; 97.7 KiB is available" \
        in one_error_line(capsys)
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf", "-q") == 2
    assert "convert: its largest tensor (in float32) need 128.0 KiB of host memory" in one_error_line(capsys)
    assert os.listdir(tmp_path) == ["ids.npy"]


# ----- 3. outputs checked before the work; a write that fails midway leaves nothing -----


def test_read_only_outputs(ckpt, mount, tmp_path, capsys):
    ro = read_only(mount("1m"))
    ids = tmp_path / "ids.npy"
    np.save(ids, np.ones((1, 4), np.int32))
    assert run_cli("forward", "--checkpoint", ckpt, "--input-ids", ids, "--output", ro / "l.npy") == 2
    assert f"--output {ro / 'l.npy'}: folder {ro} is on a read-only file system" in one_error_line(capsys)
    assert run_cli("generate", "--checkpoint", ckpt, "--prompt-ids", ids, "--output", ro / "g.npy") == 2
    assert f"--output {ro / 'g.npy'}: folder {ro} is on a read-only file system" in one_error_line(capsys)
    assert run_cli("init", "--config", "tiny", "--out", ro / "ck") == 2
    assert f"--out {ro / 'ck'}: folder {ro} is on a read-only file system" in one_error_line(capsys)
    assert run_cli("data", "inspect", "--rows", "0", "--batches", "1", "--write-rows", "2", "--out",
                   ro / "rows.npz") == 2
    assert "is on a read-only file system" in one_error_line(capsys)
    assert os.listdir(ro) == []


def test_full_disk_and_misplaced_outputs(ckpt, mount, tmp_path, capsys):
    full = fill(mount("256k"))
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", full / "hf", "-q") == 2
    assert f"--out {full / 'hf'}: no space left on device (folder {full})" in one_error_line(capsys)
    assert run_cli("plot", ckpt, "--out", tmp_path / "no" / "c.png") == 2
    assert f"folder {tmp_path / 'no'} does not exist" in one_error_line(capsys)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.ones((1, 4), np.int32))
    assert run_cli("forward", "--checkpoint", ckpt, "--input-ids", ids, "--output", tmp_path) == 2
    assert f"--output {tmp_path}: is a directory; name a file" in one_error_line(capsys)
    assert os.listdir(full) == ["filler"] and sorted(os.listdir(tmp_path)) == ["ids.npy", "mnt"]


def test_disk_fills_midway(ckpt, mount, tmp_path, capsys):
    """The outputs fit the check (space is left) but not the disk: one line naming the path, nothing partial."""
    small = mount("512k")
    assert run_cli("init", "--config", "tiny", "--out", small / "ck") == 2
    assert one_error_line(capsys) == f"glm5: error: {small / 'ck'}: no space left on device while writing"
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", small / "hf", "--dtype", "float32",
                   "-q") == 2
    assert one_error_line(capsys) == f"glm5: error: {small / 'hf'}: no space left on device while writing"
    ids = tmp_path / "ids.npy"
    np.save(ids, np.ones((2, 200), np.int32))  # 2 x 200 x 512 float32 logits: 800 KB
    assert run_cli("forward", "--checkpoint", ckpt, "--input-ids", ids, "--output", small / "l.npy") == 2
    assert one_error_line(capsys) == f"glm5: error: {small / 'l.npy'}: no space left on device while writing"
    assert os.listdir(small) == []


# ----- 4. disk full while training: one line, the committed step intact, resume exact -----


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (saves at 3 and 6): its losses."""
    root = tmp_path_factory.mktemp("ref")
    recipe = T.write_recipe(root / "r.yaml", stages=[{**T.RECIPE["stages"][0], "steps": 6}])
    code, out = T.run(recipe, root / "run", "metrics.tensorboard=false")
    assert code == 0, out
    return recipe, T.losses(root / "run")


@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_at_the_second_save(async_save, reference, mount):
    recipe, expected = reference
    point = mount("3200k")  # step 3's checkpoint (2.1 MB) fits, step 6's does not
    run_dir = point / "run"
    flags = ("metrics.tensorboard=false", f"checkpoint.async_save={str(async_save).lower()}")
    code, out = T.run(recipe, run_dir, *flags)
    errors = [line for line in out.splitlines() if line.startswith("glm5:")]
    assert code == 2 and "Traceback" not in out, out
    assert errors == [f"glm5: error: {run_dir}: no space left on device while saving step 6"], out
    assert T.committed(run_dir) == [3]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["3"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(point)], check=True)
    code, out = T.run(recipe, run_dir, *flags)
    assert code == 0 and "resumed from" in out, out
    assert T.committed(run_dir) == [3, 6]
    assert T.losses(run_dir) == expected
