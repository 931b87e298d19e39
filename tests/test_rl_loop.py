"""The RL loop of `glm5 train`: a tiny GRPO run on JSONL prompts with a reward of the user's own (by import
path) rolls out, scores, trains; kill -9 between the two updates of a rollout resumes to the uninterrupted
run's rewards and losses exactly; the DSA indexer is bitwise unchanged; bad inputs are one line, exit status
2, before anything compiles or is written."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from tests import train_util as u
from tests.conftest import run_cli

WORDS = ["os.path", "json", "re.sub", "abc", "csv", "heapq", "glob", "html", "uuid", "copy", "shlex", "string"]


def prompts_file(path) -> str:
    with open(path, "w") as f:
        for w in WORDS:
            f.write(json.dumps({"prompt": f"Say {w}", "answer": w}) + "\n")
    return str(path)


def rl_recipe(tmp_path, init, **changes) -> str:
    data = {"tokenizer": {"kind": "bytes"},
            "sources": {"p": {"kind": "jsonl", "format": "prompts", "paths": [prompts_file(tmp_path / "p.jsonl")]}},
            # 8 samples of up to 48 tokens per optimizer step: 2 prompts x 4 samples, two updates per rollout.
            "stages": [{"name": "rl", "seq_len": 48, "tokens_per_step": 384, "tokens": 384 * 6,
                        "mixture": {"p": 1.0}}], "seed": 0}
    with open(tmp_path / "rl-data.yaml", "w") as f:
        json.dump(data, f)
    stage = {"name": "rl", "objective": "grpo", "trainable": "no_indexer",
             "schedule": {"schedule": "constant", "learning_rate": 1e-2},
             "rl": {"group_size": 4, "max_new_tokens": 16, "updates_per_rollout": 2, "reward": "tests.reward_fns:e_share",
                    "reward_workers": 1, "eval_prompts": 2}}
    change = changes.pop("stage", {})
    stage["rl"].update(change.pop("rl", {}))
    stage.update(change)
    recipe = {"model": None, "init_from": init, "data": str(tmp_path / "rl-data.yaml"), "layout": None,
              "layout_overrides": {"mesh": {"data": 2}}, "data_overrides": {}, "model_overrides": {},
              "losses": {"mtp_weight": 0.0, "balance_weight": 0.0, "bias_update_rate": 0.0},
              "eval": {"holdout": 0.2, "interval_steps": 3, "at_start": True}, "checkpoint": {"interval_steps": 1},
              "stages": [stage], **changes}
    return u.write_recipe(tmp_path / "rl.yaml", **recipe)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A 2-layer tiny model (index_topk 16 < 48: DSA's sparse path) written as a checkpoint."""
    out = tmp_path_factory.mktemp("init") / "ckpt"
    assert run_cli("init", "--config", "tiny", "--out", str(out), "--override", "num_hidden_layers=2",
                   "--override", "first_k_dense_replace=1") == 0
    return str(out)


def test_rl_run_kill9_resumes_exactly_and_keeps_the_indexer(tmp_path, init):
    recipe = rl_recipe(tmp_path, init)
    ref = tmp_path / "reference"
    code, out = u.run(recipe, ref, devices=2, timeout=400)
    assert code == 0, out
    records = u.records(ref)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    rollouts = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in rollouts] == [1, 3, 5]  # a rollout every 2 updates, its figures on its first
    assert all(r["rho_q100"] == 1.0 == r["rho_q01"] for r in rollouts)  # one layout: rho = 1 exactly
    with open(ref / "eval.jsonl") as f:
        evals = [json.loads(line) for line in f]
    assert [e["step"] for e in evals] == [0, 3, 6] and all(e["samples"] == 8 for e in evals)

    killed = tmp_path / "killed"
    proc = u.start(recipe, killed, devices=2)
    u.wait_for_step(proc, killed, 3, timeout=400)  # step 3: the first update of the second rollout
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, out = u.run(recipe, killed, devices=2, timeout=400)
    assert code == 0 and "resumed from" in out, out
    assert _same(u.records(killed), records)
    with open(killed / "eval.jsonl") as f:
        assert [(e["step"], e["reward"]) for e in map(json.loads, f)] == [(e["step"], e["reward"]) for e in evals]

    start, end = _init_params(init), u.params(ref)
    indexer = [k for k in start if ".indexer." in k]
    assert indexer and all(np.array_equal(start[k], end[k]) for k in indexer)
    assert any(not np.array_equal(start[k], end[k]) for k in start if ".indexer." not in k)


def _same(a: list[dict], b: list[dict]) -> bool:
    """The two runs' records of each step agree in every figure that does not measure time."""
    timed = ("tokens_per_s", "mfu", "step_time", "generate_s", "reward_s", "logprob_s", "resumed_from")
    last = {r["step"]: {k: v for k, v in r.items() if k not in timed} for r in a}
    return all(last[r["step"]] == {k: v for k, v in r.items() if k not in timed} for r in b)


def _init_params(init) -> dict:
    from glm5_jax.checkpoint.store import CheckpointReader

    reader = CheckpointReader(init)
    return {name: reader.open(name).read().result() for name in reader.names}


@pytest.mark.parametrize("change, message", [
    ({"stage": {"rl": {"reward": "nopkg.rewards:score"}}},
     "stages.0.rl.reward: nopkg.rewards:score: no module named 'nopkg'"),
    ({"stage": {"rl": {"group_size": 1}}},
     "stages.0.rl.group_size: objective grpo compares the samples of a prompt's group"),
    ({"stage": {"rl": {"max_new_tokens": 40}}},
     "stages.0.rl.max_new_tokens: a prompt of"),
    ({"stage": {"objective": "distill", "rl": {"group_size": 1, "teacher": "TEACHER"}}},
     "stages.0.rl.teacher: the teacher's vocabulary (300 ids) is not the model's (512)"),
    ({"stage": {"trainable": "all"}},
     "stages.0.trainable: RL keeps the DSA indexer frozen; use no_indexer"),
    ({"stage": {"rl": {"asynchronous": {"workers": 0}}}},
     "stages.0.rl.asynchronous.workers: must be"),
    ({"stage": {"rl": {"asynchronous": {"placement": "ring"}}}},
     "stages.0.rl.asynchronous.placement: must be pack or spread; got 'ring'"),
    ({"stage": {"rl": {"asynchronous": {"workers": 2}}}},  # (the recipe's updates_per_rollout is 2)
     "stages.0.rl.updates_per_rollout: an asynchronous stage trains each sample once"),
])
def test_bad_rl_input_is_one_line_before_compiling(tmp_path, init, change, message):
    teacher = tmp_path / "teacher"
    if "TEACHER" in json.dumps(change):
        assert run_cli("init", "--config", "tiny", "--out", str(teacher), "--override", "vocab_size=300",
                       "--override", "num_hidden_layers=1", "--override", "first_k_dense_replace=1") == 0
        change["stage"]["rl"]["teacher"] = str(teacher)
    recipe = rl_recipe(tmp_path, init, **change)
    code, out = u.run(recipe, tmp_path / "run", devices=2)
    assert code == 2, out
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"glm5: error: {message}"), out
    assert "compiling" not in out and not (tmp_path / "run").exists()
