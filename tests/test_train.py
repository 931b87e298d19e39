"""glm5 train: recipes, exact resume after kill -9, restore onto another mesh, a bad latest checkpoint,
export of the trained checkpoint. Training runs in child processes (8 or 4 simulated CPU devices)."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal

import numpy as np
import pytest

from tests import train_util as u
from tests.conftest import run_cli


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at 3, 6, 9, 12), shared by the xdist workers."""
    root = tmp_path_factory.getbasetemp().parent
    run_dir = root / "train-reference"
    with open(root / "train-reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run_dir / "done").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            recipe = u.write_recipe(root / "reference.yaml")
            code, out = u.run(recipe, run_dir)
            assert code == 0, out
            (run_dir / "done").write_text("ok")
    return str(run_dir), str(root / "reference.yaml")


def test_recipes_load_and_errors_are_one_line(tmp_path, capsys):
    from glm5_jax.errors import ConfigError
    from glm5_jax.train import recipe
    from glm5_jax.train.setup import resolve

    r = recipe.load("quickstart")
    res = resolve(r)
    assert [s.name for s in res.data_cfg.stages] == [s.name for s in r.stages]
    assert [(s.data.accumulate, s.data.micro_rows) for s in res.stages] == [(1, 16), (1, 8)]
    glm5 = recipe.load("glm5")
    with pytest.raises(ConfigError, match=r"^layout: mesh: axis sizes .* multiply to 256, but there are 8 devices"):
        resolve(glm5)  # the 744B layout needs its 256 devices (glm5 plan simulates them)
    assert [s.trainable for s in glm5.stages].count("indexer") == 1
    for overrides, message in [
        (["stages.0.trainable=some"], "stages.0.trainable: must be one of all, indexer, no_indexer"),
        (["checkpoint.max_to_kep=2"], "checkpoint.max_to_kep: unknown recipe key (did you mean 'checkpoint.max_to_keep'?)"),
        (["start_stage=nope"], "start_stage: no stage named 'nope'"),
        (["stages.9.steps=3"], "stages.9.steps: '9' is not an index of a list of 2 (0..1)"),
        (["stages.0.schedule.lr=1"], "stages.0.schedule.lr: unknown schedule key"),
    ]:
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                                             .replace("?", r"\?")):
            recipe.load("quickstart", overrides)
    with pytest.raises(ConfigError, match="stages.0.data_stage: data config 'default' has no stage 'x'"):
        resolve(recipe.load("quickstart", ["stages.0.data_stage=x"]))
    with pytest.raises(ConfigError, match="stages.0.schedule: .*schedule: must be one of"):
        resolve(recipe.load("quickstart", ["stages.0.schedule.schedule=cos"]))
    with pytest.raises(ConfigError, match=r"^stages.0: 16 rows per step as 3 microbatches do not split"):
        resolve(recipe.load("quickstart", ["accumulate=3"]))
    with pytest.raises(ConfigError, match=r"^stages.0.accumulate: auto: no split of 16 rows of 128 .* "
                                          r"max_tokens_per_device=16 tokens"):
        resolve(recipe.load("quickstart", ["accumulate=auto", "max_tokens_per_device=16"]))
    assert run_cli("train", "--config", "quickstart", "metrics.interval=0") == 2
    err = capsys.readouterr().err.strip()
    assert err == "glm5: error: metrics.interval: must be a positive integer; got 0"


def test_kill9_then_resume_equals_uninterrupted_run(reference, tmp_path):
    ref_dir, recipe = reference
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kill_at = sorted(rng.sample(range(2, 11), 2))
    for k in kill_at:  # kill -9 at a random step, then start again in the same run dir
        proc = u.start(recipe, run_dir)
        u.wait_for_step(proc, run_dir, k)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    code, out = u.run(recipe, run_dir)
    assert code == 0, out
    assert "resumed from" in out
    ref_losses, losses = u.losses(ref_dir), u.losses(run_dir)
    assert sorted(losses) == list(range(1, 13))
    assert losses == ref_losses  # the whole loss curve, bit for bit
    ref_params, params = u.params(ref_dir, 12), u.params(run_dir, 12)
    assert ref_params.keys() == params.keys()
    for name in ref_params:
        np.testing.assert_array_equal(params[name], ref_params[name], err_msg=name)
    assert ref_losses[12] < ref_losses[1] - 1.0  # it learns


def test_restore_on_4_devices_in_another_layout(reference, tmp_path):
    ref_dir, recipe = reference
    run_dir = tmp_path / "resharded"
    shutil.copytree(ref_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "12")  # resume from step 9 (saved on 8 devices: data x expert x tensor)
    code, out = u.run(recipe, run_dir, "layout_overrides.mesh={fsdp: 2, tensor: 2}", "max_steps=11", devices=4)
    assert code == 0, out
    assert "resumed from" in out and "on 4 cpu devices" in out
    ref, new = u.losses(ref_dir), u.losses(run_dir)
    for step in (10, 11):
        assert new[step] == pytest.approx(ref[step], rel=1e-5), (step, new[step], ref[step])


def test_bad_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    ref_dir, recipe = reference
    run_dir = tmp_path / "corrupt"
    shutil.copytree(ref_dir, run_dir)
    # Step 12 loses an array file (an unreadable array); step 9 is intact.
    params_dir = run_dir / "checkpoints" / "12" / "params"
    files = sorted(p for p in params_dir.rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, sorted(params_dir.rglob("*"))
    for f in files:
        f.write_bytes(b"garbage")
    code, out = u.run(recipe, run_dir)
    assert code == 0, out
    assert "checkpoint step 12" in out and "resuming from the previous committed step 9" in out, out
    assert (run_dir / "checkpoints-bad").is_dir()
    assert u.committed(run_dir)[-1] == 12
    assert u.losses(run_dir) == u.losses(ref_dir)  # steps 10..12 trained again, same numbers


def test_trained_checkpoint_exports_to_hf(reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "hf"
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", os.path.join(ref_dir, "checkpoints"), "--out", out,
                   "--dtype", "float32", "-q") == 0
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    from safetensors.numpy import load_file

    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    params = u.params(ref_dir, 12)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], params["embed_tokens"])


def test_start_at_a_later_stage_from_a_converted_hf_checkpoint(hf_model_dir, convert, tmp_path):
    """init_from a checkpoint made by `glm5 convert hf-to-orbax`, entering at the second stage. With a zero
    learning rate and no bias updates the trained checkpoint holds exactly the converted weights."""
    hf_dir, _ = hf_model_dir(vocab_size=512, num_hidden_layers=2, first_k_dense_replace=1)
    ckpt = convert(hf_dir)
    stages = [{"name": "short", "steps": 3, "schedule": {"schedule": "constant", "learning_rate": 3e-3}},
              {"name": "long", "steps": 2, "schedule": {"schedule": "constant", "learning_rate": 0.0}}]
    data = {**u.RECIPE["data_overrides"], "stages.1.seq_len": 32, "stages.1.tokens_per_step": 256}
    recipe = u.write_recipe(tmp_path / "from-hf.yaml", model=None, model_overrides={}, init_from=ckpt,
                            start_stage="long", stages=stages, data_overrides=data,
                            losses={"mtp_weight": 0.0, "bias_update_rate": 0.0})
    run_dir = tmp_path / "run"
    code, out = u.run(recipe, run_dir)
    assert code == 0, out
    assert "initialised from" in out, out
    logged = u.records(run_dir)
    assert [r["step"] for r in logged] == [4, 5] and {r["stage"] for r in logged} == {"long"}, logged
    from glm5_jax.checkpoint.store import CheckpointReader

    reader = CheckpointReader(ckpt)
    trained = u.params(run_dir, 5)
    assert set(trained) == set(reader.names)
    for name in reader.names:
        np.testing.assert_array_equal(trained[name], reader.open(name).read().result(), err_msg=name)


def test_no_restorable_step_is_one_line_and_moves_nothing(reference, tmp_path):
    ref_dir, recipe = reference
    run_dir = tmp_path / "all-bad"
    shutil.copytree(ref_dir, run_dir)
    steps = u.committed(run_dir)
    for step in steps:  # every step's train state garbled
        (run_dir / "checkpoints" / str(step) / "train" / "metadata").write_text("{not json")
    code, out = u.run(recipe, run_dir)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"glm5: error: {run_dir / 'checkpoints'}: no checkpoint step could be restored "
                           f"(nothing was moved); newest step {steps[-1]}: "), out
    assert u.committed(run_dir) == steps and not (run_dir / "checkpoints-bad").exists()


def test_a_stage_in_another_layout_continues_after_a_restart(tmp_path):
    """A recipe whose second stage names another layout trains to that stage, saves and stops; the same
    command again continues there in the stage's layout, with the losses of a run in one layout throughout."""
    schedule = {"schedule": "constant", "learning_rate": 3e-3}
    stages = [{"name": "a", "data_stage": "short", "steps": 2, "schedule": schedule},
              {"name": "b", "data_stage": "short", "steps": 2, "schedule": schedule}]
    one = u.write_recipe(tmp_path / "one.yaml", stages=stages)
    two = u.write_recipe(tmp_path / "two.yaml", stages=[stages[0], {**stages[1], "layout": "fsdp4-tp2"}])
    code, out = u.run(one, tmp_path / "one")
    assert code == 0, out
    code, out = u.run(two, tmp_path / "two")
    assert code == 0, out
    assert "stage b runs in another layout: this run trains to step 2, saves and stops" in out
    assert u.committed(tmp_path / "two")[-1] == 2 and max(u.losses(tmp_path / "two")) == 2
    code, out = u.run(two, tmp_path / "two")
    assert code == 0, out
    assert "resumed from" in out and "'fsdp': 4" in out and "'expert': 1" in out, out
    want, got = u.losses(tmp_path / "one"), u.losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
