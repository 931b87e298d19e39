"""Asynchronous RL on Ray (glm5_jax/rl/async_feed.py, worker.py, buffer.py) through `glm5 train`: two rollout
workers generate while the trainer trains; both are killed with SIGKILL mid-run, one of them holding work (its
samples' reward held back by a gate), and Ray restarts them; SIGTERM to
the driver saves and stops with every process Ray started gone; the resumed run finishes. Every trained
sample is within the staleness bound, none is trained at two steps, the engines' log-probs of tokens the
trainer's current weights drew equal the trainer's own, and partial rollouts carry several versions."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil

from tests import train_util as u
from tests.test_rl_loop import init, rl_recipe  # noqa: F401 - the module's tiny checkpoint fixture

TAU = 1
ASYNC = {"workers": 2, "max_staleness": TAU, "segment_tokens": 4, "worker_rows": 8}


def _recipe(tmp_path, init_dir, gate) -> str:
    """The RL recipe with every prompt's reward held while the file `gate` exists (tests/reward_fns.py:gated)."""
    recipe = rl_recipe(tmp_path, init_dir, stage={"steps": 14, "rl": {"updates_per_rollout": 1, "asynchronous": ASYNC,
                                                                      "reward": "tests.reward_fns:gated"}},
                       eval={"holdout": 0.2, "interval_steps": 7, "at_start": False})
    prompts = tmp_path / "p.jsonl"
    items = [{**json.loads(line), "gate": str(gate)} for line in prompts.read_text().splitlines()]
    prompts.write_text("".join(json.dumps(i) + "\n" for i in items))
    return recipe


def _workers(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "RolloutWorker" in " ".join(p.cmdline())]


def _until(proc, done, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("timed out")


def _wait(proc, run_dir, what, timeout=300):
    """Until what(record) holds for a record of RUN_DIR/metrics.jsonl."""
    _until(proc, lambda: any(what(r) for r in u.records(run_dir)), timeout)


def test_async_run_survives_killed_workers_and_sigterm(tmp_path, init):
    gate = tmp_path / "gate"
    recipe, run_dir = _recipe(tmp_path, init, gate), tmp_path / "run"
    proc = u.start(recipe, run_dir, devices=2)
    _wait(proc, run_dir, lambda r: r["step"] >= 2)
    gate.touch()  # the next reward is held: the worker that asked for it holds its samples in flight
    _until(proc, lambda: os.path.exists(f"{gate}.held"))
    for victim in _workers(proc):
        victim.send_signal(signal.SIGKILL)
    gate.unlink()
    _wait(proc, run_dir, lambda r: r.get("worker_restarts", 0) >= 2)  # Ray restarted both and they asked for work
    started = psutil.Process(proc.pid).children(recursive=True)  # every process Ray started (raylet, workers, ...)
    assert len(_workers(proc)) == 2
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: saving step" in out, out
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    stopped_at = u.records(run_dir)[-1]["step"]
    assert stopped_at < 14

    code, out = u.run(recipe, run_dir, devices=2, timeout=400)
    assert code == 0, out
    records = {r["step"]: r for r in u.records(run_dir)}
    assert sorted(records) == list(range(1, 15))
    last = records[14]
    assert last["regenerated"] >= 1 and last["worker_restarts"] == 2  # the killed workers' lives across both runs
    assert all(f"staleness_{k}" in last for k in range(TAU + 1)) and "dropped_stale" in last

    steps = {}
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        for line in f:  # (a step trained again after a resume: its last record counts)
            r = json.loads(line)
            steps[r["step"]] = r
    assert sorted(steps) == list(range(1, 15))
    seen: dict[int, int] = {}
    for step, r in steps.items():
        assert len(r["sample_ids"]) == 8 and max(r["staleness"]) <= TAU
        assert sum(records[step][f"staleness_{k}"] for k in range(TAU + 1)) == 8
        for sid in set(r["sample_ids"]):
            assert sid not in seen, f"sample {sid} trained at steps {seen[sid]} and {step}"
            seen[sid] = step
    assert any(n > v for r in steps.values() for n, v in zip(r["newest"], r["versions"]))  # partial rollouts
    gaps = [r["fresh_logp_gap_max"] for r in records.values() if r.get("fresh_logp_gap_max") is not None]
    assert gaps and max(gaps) < 1e-4, gaps  # engine vs trainer, same weights: float32 rounding only
