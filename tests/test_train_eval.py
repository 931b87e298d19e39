"""glm5 train with the batch-size ramp (rows per step follow the schedule, kill -9 mid-ramp resumes bit for bit,
one compiled program) and held-out evaluation (eval.jsonl, `glm5 eval` on a run's and a converted HF
checkpoint). Training runs in child processes on 8 simulated CPU devices."""

from __future__ import annotations

import json
import signal

from glm5_jax.data import config as data_config
from glm5_jax.data.stages import Schedule
from tests import train_util as u
from tests.conftest import run_cli

# 16 rows of 32 per step after the ramp, as 4 microbatches of 4 rows; the ramp starts at 4 rows (1 microbatch)
# and reaches 16 after 3,000 tokens; the stage's budget of 9,000 tokens gives 23 steps.
RAMP = {"data_overrides": {"stages.0.seq_len": 32, "stages.0.tokens_per_step": 512, "stages.0.tokens": 9000,
                           "stages.0.batch_ramp": {"start_tokens_per_step": 128, "tokens": 3000}},
        "accumulate": 4, "stages": [{"name": "short", "schedule": {"schedule": "constant", "learning_rate": 3e-3}}],
        "checkpoint": {"interval_steps": 4, "max_to_keep": 3}}


def expected_rows() -> dict[int, int]:
    cfg = data_config.load("default", RAMP["data_overrides"])
    stage = Schedule([cfg.stages[0]], 1, {cfg.stages[0].name: 4}).stages[0]
    return {s + 1: stage.count(s) * stage.micro_rows for s in range(stage.steps)}


def test_ramp_rows_programs_and_kill9_resume(tmp_path):
    want = expected_rows()
    assert min(want.values()) == 4 and max(want.values()) == 16 and len(want) == 23
    recipe = u.write_recipe(tmp_path / "ramp.yaml", **RAMP)
    ref_dir = tmp_path / "reference"
    code, out = u.run(recipe, ref_dir)
    assert code == 0, out
    assert "1 train step program(s) compiled" in out  # the whole ramp is one program (a traced count)
    assert {r["step"]: r["rows"] for r in u.records(ref_dir)} == want
    run_dir = tmp_path / "killed"
    proc = u.start(recipe, run_dir)
    u.wait_for_step(proc, run_dir, 10)  # mid-ramp (checkpoint at 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, out = u.run(recipe, run_dir)
    assert code == 0 and "resumed from" in out, out
    assert u.losses(run_dir) == u.losses(ref_dir)  # bit for bit


def test_eval_during_training_and_glm5_eval(tmp_path, capsys, hf_model_dir, convert):
    recipe = u.write_recipe(tmp_path / "eval.yaml", eval={"holdout": 0.05, "interval_steps": 5, "batches": 2})
    run_dir = tmp_path / "run"
    code, out = u.run(recipe, run_dir)
    assert code == 0, out
    with open(run_dir / "eval.jsonl") as f:
        evals = [json.loads(line) for line in f]
    assert [e["step"] for e in evals] == [5, 10, 12]  # every 5 steps and the stage's last
    assert all(e["loss"] > 0 and e["ppl"] > 1 and e["tokens"] > 0 for e in evals)
    assert evals[-1]["lm"] < evals[0]["lm"]  # held-out loss falls as it trains
    assert "eval loss" in out
    assert run_cli("plot", str(run_dir), "--out", str(tmp_path / "c.png")) == 0
    data = ["--data", "default", "--data-override", "stages.0.seq_len=32", "--data-override",
            "stages.0.tokens_per_step=256", "--batches", "2"]
    capsys.readouterr()
    # glm5 eval on the run's held-out documents gives what the run logged at its last step.
    assert run_cli("eval", "--checkpoint", str(run_dir / "checkpoints"), *data, "--holdout", "0.05") == 0
    printed = capsys.readouterr().out
    assert "step 12 on default stage" in printed and "perplexity" in printed, printed
    assert f"loss {evals[-1]['loss']:.4f}, LM loss {evals[-1]['lm']:.4f}" in printed, (printed, evals[-1])
    # --step reads that step's weights (an earlier step, an earlier loss).
    assert run_cli("eval", "--checkpoint", str(run_dir / "checkpoints"), *data, "--holdout", "0.05", "--step", 9) == 0
    printed = capsys.readouterr().out
    assert "step 9 on default stage" in printed and f"LM loss {evals[-1]['lm']:.4f}" not in printed, printed
    hf_dir, _ = hf_model_dir(vocab_size=512, num_hidden_layers=2, first_k_dense_replace=1)
    assert run_cli("eval", "--checkpoint", convert(hf_dir), *data) == 0
    assert "step 0 on default stage" in capsys.readouterr().out
    assert run_cli("eval", "--checkpoint", str(run_dir / "checkpoints"), *data[:2], "--batches", "0") == 2
    assert capsys.readouterr().err.strip() == "glm5: error: --batches: must be a positive integer; got 0"
