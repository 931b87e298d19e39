"""Bad conversion input fails with one clear line and leaves no output directory behind."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import run_cli


def edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def edit_tensors(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


BREAKAGES = {
    "heads-vs-q_b_proj": (lambda p: edit_config(p, num_attention_heads=8, num_key_value_heads=8),
                          "tensor model.layers.0.self_attn.q_b_proj.weight has shape [128, 48], but config.json "
                          "implies [256, 48]"),
    "wrong-shape": (lambda p: edit_tensors(p, lambda t: t.update({"model.layers.2.mlp.experts.3.up_proj.weight":
                                                                     t["model.layers.2.mlp.experts.3.up_proj.weight"][:, :60]})),
                    "tensor model.layers.2.mlp.experts.3.up_proj.weight has shape [32, 60], but config.json implies [32, 64]"),
    "missing-tensor": (lambda p: edit_tensors(p, lambda t: t.pop("model.layers.1.self_attn.indexer.wk.weight")),
                       "missing tensor model.layers.1.self_attn.indexer.wk.weight"),
    "unexpected-tensor": (lambda p: edit_tensors(p, lambda t: t.update({"model.layers.9.foo.weight": t["model.norm.weight"]})),
                          "unexpected tensor model.layers.9.foo.weight"),
    "model-type": (lambda p: edit_config(p, model_type="deepseek_v3"),
                   "model_type: only 'glm_moe_dsa' (GLM-5) is supported; got 'deepseek_v3'"),
    "bad-config-value": (lambda p: edit_config(p, index_topk=0), "index_topk: must be a positive integer, got 0"),
    "no-weights": (lambda p: os.remove(os.path.join(p, "model.safetensors")), "neither model.safetensors nor"),
    "int-tensor": (lambda p: edit_tensors(p, lambda t: t.update({"model.norm.weight":
                                                                 t["model.norm.weight"].astype("int32")})),
                   "tensor model.norm.weight has dtype I32; a parameter must be floating point"),
    "config-list": (lambda p: open(os.path.join(p, "config.json"), "w").write("[1, 2]"),
                    "config.json: must hold a JSON object of keys and values; got a list"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_bad_hf_directory_fails_cleanly(case, hf_model_dir, tmp_path, capsys):
    path, _ = hf_model_dir(seed=9)
    breakage, message = BREAKAGES[case]
    breakage(path)
    out = tmp_path / "out" / "ckpt"
    capsys.readouterr()
    assert run_cli("convert", "hf-to-orbax", "--hf-dir", path, "--out", out, "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("glm5: error: ") and message in err[0], err[0]
    assert not out.exists()
    leftovers = os.listdir(out.parent) if out.parent.exists() else []
    assert leftovers == [], leftovers


def test_existing_output_is_not_touched(hf_model_dir, convert, tmp_path, capsys):
    path, _ = hf_model_dir(seed=10)
    ckpt = convert(path, "ckpt")
    marker = os.path.join(ckpt, "keep-me")
    open(marker, "w").close()
    capsys.readouterr()
    assert run_cli("convert", "hf-to-orbax", "--hf-dir", path, "--out", ckpt, "-q") == 2
    assert "already exists" in capsys.readouterr().err
    assert os.path.exists(marker)
    export = tmp_path / "export"
    os.makedirs(export)
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", export, "-q") == 2
    assert os.listdir(export) == []


def test_export_of_missing_or_uncommitted_checkpoint(tmp_path, capsys):
    capsys.readouterr()
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "o", "-q") == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty" / "3.orbax-checkpoint-tmp-123")
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", tmp_path / "empty", "--out", tmp_path / "o", "-q") == 2
    assert "holds no committed checkpoint step" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
