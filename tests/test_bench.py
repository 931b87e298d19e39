"""`glm5 bench`: the disk speed helper, the command end to end (FLOP counting: tests/test_accounting.py)."""

from __future__ import annotations

import json
import os

import jax
import pytest

from glm5_jax import config, scopes
from glm5_jax.accounting import parts
from glm5_jax.bench import storage
from tests.conftest import run_cli

def test_disk_speed(tmp_path):
    d = storage.disk_speed(str(tmp_path), size=4 << 20, block=1 << 20)
    assert d["bytes"] == 4 << 20 and d["block_bytes"] == 1 << 20
    for key in ("write_buffered_bytes_per_s", "write_bytes_per_s", "read_bytes_per_s"):
        assert d[key] > 0
    assert d["write_buffered_bytes_per_s"] >= d["write_bytes_per_s"]  # (the same writes, without the fsync)
    assert os.listdir(tmp_path) == []


def test_bad_option_is_one_line(capsys):
    assert run_cli("bench", "--config", "tiny", "--parts", "step,speed") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--parts" in err and "speed" in err and "checkpoint" in err
    assert run_cli("bench", "--config", "no-such-thing", "--parts", "step") == 2
    assert "neither a recipe nor a model preset" in capsys.readouterr().err


def test_bench_step_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    assert run_cli("bench", "--config", "tiny", "--steps", "2", "--parts", "step", "--json", out) == 0
    r = json.loads(out.read_text())
    assert r["bench"]["parts"] == ["step"] and "data" not in r and "checkpoint" not in r
    step = r["step"]
    assert step["compile"]["lower_s"] > 0 and step["compile"]["compile_s"] > 0
    s = step["step"]
    assert s["timed_steps"] == 2 and s["warmup_steps"] == 2 and s["min_s"] <= s["median_s"] <= s["max_s"]
    assert s["tokens_per_step"] == 4096 and s["tokens_per_s"] == pytest.approx(4096 / s["median_s"])
    u = step["utilisation"]
    assert u["mfu"] > 0 and u["devices"] == jax.device_count() and "CPU" in u["peak_source"]
    f = step["flops"]
    # Loops at their trip counts: well above what XLA's cost analysis (loop bodies once) reports.
    assert f["compiled_per_device"] > 2 * f["xla_cost_analysis_per_device"]
    assert f["ratio"] == pytest.approx(f["compiled_per_device"] / f["analytic_per_device"])
    # The compiled step does the counted work: on 8 data-parallel devices each runs only its own tokens
    # through the experts (left to GSPMD, every device ran the whole batch's: 1.75). Measured 1.100: the
    # tiled expert loop's partial tiles (64 rows an expert, a few tokens each here) are work the analytic
    # count of active copies leaves out.
    assert u["devices"] == 8 and 0.95 < f["ratio"] < 1.2, f["ratio"]
    assert f["dynamic_loops"] and all(d["trips"] is not None for d in f["dynamic_loops"])
    assert {d["scope"] for d in f["dynamic_loops"]} == {scopes.TOPK_MERGE}  # (one microbatch: no accumulation)
    # The compiled step's parts, by scope, against the analytic count: the output head runs for the main
    # prediction and every MTP depth, the router in every MoE layer and the MTP layer at every depth.
    assert sum(f["by_scope"].values()) == pytest.approx(f["compiled_per_device"])
    cfg, part = config.load("tiny"), parts.by_part(f["by_scope"])
    analytic = {c["name"]: c["per_device"] for c in f["components"]}
    moe, depths = cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.mtp_depths
    assert part[parts.part(scopes.HEAD)] == pytest.approx((1 + depths) * analytic["output head"])
    assert part[parts.part(scopes.ROUTER)] == pytest.approx((moe + depths) / moe * analytic["MoE router"])
    assert part[parts.part(scopes.NEWTON_SCHULZ)] > 0 and part[parts.part(scopes.ATTENTION)] > 0
    m = step["memory"]
    assert m["temp_plus_arguments_bytes"] == m["temp_bytes"] + m["argument_bytes"] and m["peak_rss_bytes"] > 0


def test_bench_data_checkpoint_convert(tmp_path):
    out = tmp_path / "bench.json"
    assert run_cli("bench", "--config", "tiny", "--parts", "data,checkpoint,convert", "--data-batches", "3",
                   "--disk-bytes", "4MiB", "--convert-directions", "orbax-to-hf", "--work-dir", tmp_path,
                   "--json", out) == 0
    r = json.loads(out.read_text())
    assert r["data"]["batches"] == 3 and r["data"]["tokens_per_s"] > 0
    c = r["checkpoint"]
    assert c["state_bytes"] > 0 and c["save_bytes_per_s"] > 0 and c["restore_bytes_per_s"] > 0
    assert len(c["stall_times_s"]) == 2 and c["stall_of_step"] is None  # (no step part: no step time)
    assert r["disk"]["write_bytes_per_s"] > 0
    conv = r["convert"]["orbax-to-hf"]
    assert conv["peak_rss_bytes"] >= conv["rss_before_bytes"] > 0 and conv["bytes_per_s"] > 0
    assert [p for p in os.listdir(tmp_path) if p.startswith("glm5-bench-")] == []  # the work folder is removed
