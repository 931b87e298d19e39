"""`glm5 plan --recipe R --stage all`: every stage planned with the step that trains it, in its own layout.

8 simulated CPU devices (tests/conftest.py). A one-layer dense model with no MTP keeps each compile to
seconds; the stages differ in layout, sequence length, rows and accumulation, and one cannot split its batch.
"""

from __future__ import annotations

import re

import pytest
import yaml

from glm5_jax.plan.devices import parse_bytes, parse_target
from glm5_jax.plan.report import stage_table
from glm5_jax.plan.stages import plan_recipe
from glm5_jax.train import recipe as recipe_lib
from glm5_jax.train import setup
from tests.conftest import run_cli

MODEL = {"num_hidden_layers": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "remat_policy": "none",
         "hidden_size": 128, "intermediate_size": 384, "vocab_size": 1024}
RECIPE = {
    "model": "tiny", "model_overrides": MODEL, "layout": "dp8", "data": "default",
    # short: 16 rows of 32 as 2 microbatches of 8 (one per data shard); long: 8 rows of 64 on fsdp 4 x
    # tensor 2 (4 batch shards: 2 microbatches of 4); odd: short's 16 rows as 4 microbatches of 4 rows on
    # 8 data shards, which cannot split.
    "data_overrides": {"stages.0.seq_len": 32, "stages.0.tokens_per_step": 512,
                       "stages.1.seq_len": 64, "stages.1.tokens_per_step": 512},
    "losses": {"mtp_weight": 0.0, "bias_update_rate": 0.0},
    "stages": [{"name": "short", "steps": 2, "accumulate": 2},
               {"name": "long", "steps": 2, "layout": "fsdp4-tp2", "accumulate": 2},
               {"name": "odd", "data_stage": "short", "steps": 2, "accumulate": 4,
                "layout_overrides": {"mesh": {"data": 8}}}],
}


def _recipe(tmp_path, **changes):
    path = tmp_path / "two_layouts.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **changes}))
    return str(path)


def _text(table) -> str:
    import io

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=260).print(table)
    return out.getvalue()


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The recipe's three stages planned on 8 simulated devices (two compiles), and the printed table."""
    import jax

    recipe = recipe_lib.load(_recipe(tmp_path_factory.mktemp("recipe")))
    rows = plan_recipe(recipe, "all", jax.devices()[:8], parse_target("cpu"), parse_bytes("80GB", "--device-memory"))
    return rows, _text(stage_table(rows))


def test_every_stage_in_its_own_layout(planned):
    rows, table = planned
    short, long_, odd = rows
    assert (short.seq_len, short.rows, short.accumulate, short.micro_rows) == (32, 16, 2, 8)
    assert (long_.seq_len, long_.rows, long_.accumulate, long_.micro_rows) == (64, 8, 2, 4)
    assert dict(short.result.inputs.par.mesh.shape)["data"] == 8 and short.fits
    assert {k: v for k, v in long_.result.inputs.par.mesh.shape.items() if v > 1} == {"fsdp": 4, "tensor": 2}
    assert long_.fits and long_.result.inputs.step.spec.batch_shape == (2, 4, 64)
    assert odd.result is None and odd.error == ("stages.2: 16 rows per step as 4 microbatches do not split into 8 "
                                                "batch shards x 1 pipeline microbatches; use a multiple of 32 rows")
    line = lambda name: next(t for t in table.splitlines() if t.startswith(f"│ {name} "))
    assert "data 8" in line("short") and "2 x 8" in line("short") and re.search(r"│\s+16 │", line("short"))
    assert "fsdp 4 x tensor 2" in line("long") and "2 x 4" in line("long") and "yes (" in line("long")
    assert table.count("│ odd ") == 1 and "no: stages.2: 16 rows per step" in line("odd")


def test_a_stage_that_does_not_fit_keeps_its_row(planned):
    import dataclasses

    rows, _ = planned
    tight = [dataclasses.replace(r, result=dataclasses.replace(r.result, device_memory=2**20)) if r.result else r
             for r in rows]
    assert [r.fits for r in tight] == [False, False, False]
    table = _text(stage_table(tight))
    for name, r in (("short", rows[0]), ("long", rows[1])):
        over = (r.result.memory.peak - 2**20) / 2**30
        assert re.search(rf"│ {name} .*│ no \({over:,.2f} GiB over\)", table), name


def test_the_cli_prints_the_table_of_a_stage_without_a_plan(tmp_path, capsys):
    """`--stage odd` cannot split its batch: the command still prints its row (no compile) and exits 0."""
    assert run_cli("plan", "--recipe", _recipe(tmp_path), "--stage", "odd") == 0
    out = capsys.readouterr().out
    assert "stage odd: no plan: stages.2: 16 rows per step as 4 microbatches do not split" in out
    assert re.search(r"^stages +$", out, re.MULTILINE) and "│ odd " in out and "target cpu; 8 devices." in out


def test_stage_layouts_resolve_per_stage(tmp_path):
    import jax

    recipe = recipe_lib.load(_recipe(tmp_path))
    assert setup.stage_layout(recipe, 1).mesh == {"fsdp": 4, "tensor": 2}
    assert setup.stage_layout(recipe, 2).mesh == {"data": 8}
    one = recipe_lib.from_dict({**RECIPE, "stages": RECIPE["stages"][:1]})
    run = setup.resolve(one, jax.devices()[:8])
    assert run.stages[0].par is run.par and dict(run.par.mesh.shape)["data"] == 8
    # Stages in different layouts resolve, each with its own (glm5 train stops and continues between them).
    two = setup.resolve(recipe_lib.from_dict({**RECIPE, "stages": RECIPE["stages"][:2]}), jax.devices()[:8])
    assert two.stages[1].par is not two.stages[0].par


@pytest.mark.parametrize("args,message", [
    (["--stage", "nope"], "--stage: the recipe has no stage 'nope'; stages: all, short, long, odd"),
    (["--seq-len", "64"], "--seq-len: with --recipe the recipe's stages set it"),
    (["stages.1.layout=3"], "stages.1.layout: must be a layout preset name or YAML file, or null; got 3"),
    (["stages.1.layout_overrides=[1]"], "stages.1.layout_overrides: must be a mapping; got [1]"),
    (["--target", "tpu:v9-8"], "--target: unknown TPU product 'v9'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert run_cli("plan", "--recipe", _recipe(tmp_path), *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"glm5: error: {message}") and "\n" not in err, err
