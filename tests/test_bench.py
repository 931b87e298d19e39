"""`glm5 bench`: loop-aware FLOP counting of compiled HLO, the disk speed helper, the command end to end."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest

from glm5_jax.bench import hlo_flops, loops, storage
from tests.conftest import run_cli

MATMUL = 2 * 8 * 32 * 32  # one [8, 32] @ [32, 32]


def _scan(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]


def test_cost_analysis_counts_a_loop_body_once_and_the_walker_counts_every_trip():
    compiled = jax.jit(_scan).lower(jnp.ones((8, 32)), jnp.ones((5, 32, 32))).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert MATMUL <= cost["flops"] < 2 * MATMUL  # XLA: the body once (plus a few scalar ops)
    count = hlo_flops.count_flops(compiled.as_text())
    assert count.flops == 5 * MATMUL
    assert count.once == MATMUL
    assert count.loops == 1 and count.dynamic == []
    assert sum(count.by_source.values()) == count.flops


def test_nested_and_dynamic_loops():
    def nested(x, ws):  # 3 outer trips of a 5-trip scan, then a loop whose count is an argument
        x = jax.lax.fori_loop(0, 3, lambda i, c: _scan(c, ws), x)
        return x

    def dynamic(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), x)

    x, ws = jnp.ones((8, 32)), jnp.ones((5, 32, 32))
    count = hlo_flops.count_flops(jax.jit(nested).lower(x, ws).compile().as_text())
    assert count.flops == 15 * MATMUL and count.loops == 2
    text = jax.jit(dynamic).lower(x, ws[0], 7).compile().as_text()
    assert hlo_flops.count_flops(text).flops == MATMUL  # no trip count known: once, and listed
    seen = []
    counted = hlo_flops.count_flops(text, lambda where: seen.append(where) or 7)
    assert counted.flops == 7 * MATMUL
    assert seen[0][1].endswith("dynamic") and seen[0][0].endswith("test_bench.py")
    assert counted.dynamic == [{"source": ":".join(seen[0]), "trips": 7, "executions": 1.0}]


def test_topk_merge_trips_by_hand():
    # 128 positions, blocks of 16 queries, chunks of 16 keys: block b scans chunks 0..b, b merges.
    assert loops.topk_merge_trips(128, 16, 16) == sum(range(8)) / 8
    # two context shards: shard 1's blocks start at position 64 (merges 4..7)
    assert loops.topk_merge_trips(128, 16, 16, context=2) == sum(range(8)) / 8
    # chunks of 32 (index_topk 32): blocks 0..7 need chunks 1, 1, 2, 2, 3, 3, 4, 4
    assert loops.topk_merge_trips(128, 32, 16) == (0 + 0 + 1 + 1 + 2 + 2 + 3 + 3) / 8


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
    # through the experts (left to GSPMD, every device ran the whole batch's: 1.75).
    assert u["devices"] == 8 and 0.95 < f["ratio"] < 1.10, f["ratio"]
    assert all(d["trips"] is not None for d in f["dynamic_loops"])  # the DSA top-k merge loops
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
