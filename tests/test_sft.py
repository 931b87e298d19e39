"""Supervised fine-tuning: the `sft` objective's loss equals a direct computation with transformers on the rows
`glm5 data inspect` writes, a recipe stage trains on chat data from a transformers directory, and the
objective's bad inputs are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm5_jax.errors import ConfigError
from glm5_jax.train import recipe as recipe_lib
from glm5_jax.train.evaluate import evaluate_checkpoint
from glm5_jax.train.setup import resolve
from tests import train_util as u
from tests.conftest import run_cli

# 8 rows of 256 tokens: one row per simulated device (glm5 eval runs all 8 on data).
SFT_ROWS = ["stages.0.seq_len=256", "stages.0.tokens_per_step=2048"]


def test_sft_loss_equals_transformers_on_the_inspected_rows(tmp_path, hf_model_dir, convert):
    """The assistant-token loss `glm5 eval` reports equals the masked mean cross-entropy transformers computes
    on the rows `glm5 data inspect --write-rows` wrote (each conversation run on its own: no attention across
    them), and it counts exactly the rows' scored tokens."""
    hf_dir, model = hf_model_dir(vocab_size=512)
    ckpt = convert(hf_dir)
    rows_file = tmp_path / "rows.npz"
    overrides = [a for o in SFT_ROWS for a in ("--override", o)]
    assert run_cli("data", "inspect", "--config", "sft", *overrides, "--rows", 0, "--batches", 1,
                   "--write-rows", 8, "--out", rows_file) == 0
    rows = np.load(rows_file)
    assert rows["input_ids"].shape == (8, 256)
    result = evaluate_checkpoint(ckpt, "sft", batches=1, data_overrides=SFT_ROWS, objective="sft")

    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(8):
            for seg in np.unique(rows["segment_ids"][r]):
                if seg == 0:
                    continue
                where = rows["segment_ids"][r] == seg
                ids, targets = rows["input_ids"][r][where], rows["targets"][r][where]
                assert (rows["positions"][r][where] == np.arange(where.sum())).all()
                logits = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].double()
                scored = torch.tensor(targets >= 0)
                labels = torch.tensor(targets[targets >= 0], dtype=torch.long)
                ce = torch.nn.functional.cross_entropy(logits[scored], labels, reduction="sum")
                total, count = total + float(ce), count + int(scored.sum())
    assert count == int(rows["loss_mask"].sum()) == result["tokens"]
    assert 0 < count < (rows["segment_ids"] > 0).sum()  # only the assistant's tokens are scored
    error = abs(result["lm"] - total / count) / (total / count)
    print(f"sft loss {result['lm']:.6f} vs transformers {total / count:.6f} over {count} scored tokens: {error:.2e}")
    assert error <= 1e-5


def _recipe(**stage):
    return recipe_lib.from_dict({**u.RECIPE, "data": "sft", "data_overrides": {}, "stages": [
        {"name": "sft", "steps": 2, **stage}]})


@pytest.mark.parametrize("changes,data,message", [
    ({"objective": "sft"}, "default",
     "stages.0.objective: sft trains on chat sources; data stage 'short' of 'default' reads text sources"),
    ({"objective": "sft", "losses": {"dsa": "warmup"}}, "sft", "stages.0.objective: sft: losses.dsa: warmup"),
    ({"objective": "rlhf"}, "sft", "stages.0.objective: must be one of pretrain, sft, grpo, dis, distill; got 'rlhf'"),
])
def test_objective_errors_are_one_line(changes, data, message):
    recipe = _recipe(**changes)
    recipe.data = data
    if data == "default":
        recipe.stages[0].data_stage = "short"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        resolve(recipe)
    assert "\n" not in str(e.value)


def test_sft_stage_trains_from_a_transformers_directory(tmp_path, hf_model_dir):
    """`glm5 train` with an `sft` stage, `init_from` a transformers directory (converted once into the run
    directory): it logs the assistant-token loss and the scored share, and evaluates held-out conversations."""
    hf_dir, _ = hf_model_dir(vocab_size=512, num_hidden_layers=2, first_k_dense_replace=1)
    run_dir = tmp_path / "run"
    recipe = u.write_recipe(
        tmp_path / "sft.yaml", model=None, model_overrides={}, init_from=hf_dir, data="sft",
        data_overrides={"stages.0.seq_len": 128, "stages.0.tokens_per_step": 1024},
        eval={"holdout": 0.05, "interval_steps": 3, "batches": 1},
        stages=[{"name": "sft", "steps": 3, "objective": "sft",
                 "schedule": {"schedule": "constant", "learning_rate": 1e-3}}])
    code, out = u.run(recipe, run_dir)
    assert code == 0, out
    assert "converting" in out and (run_dir / "init-from-hf").is_dir()
    records = u.records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 < r["scored_share"] < 1 and r["tokens"] > 0 for r in records)
    assert (run_dir / "eval.jsonl").read_text().count('"step": 3') == 1
