"""Asynchronous RL on Ray (glm5_jax/rl/async_feed.py, worker.py, buffer.py) through `glm5 train`: two rollout
workers generate while the trainer trains; one is killed with SIGKILL mid-run and Ray restarts it; SIGTERM to
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


def _recipe(tmp_path, init_dir) -> str:
    return rl_recipe(tmp_path, init_dir, stage={"steps": 14, "rl": {"updates_per_rollout": 1, "asynchronous": ASYNC}},
                     eval={"holdout": 0.2, "interval_steps": 7, "at_start": False})


def _workers(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "RolloutWorker" in " ".join(p.cmdline())]


def _wait(proc, run_dir, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(what(r) for r in u.records(run_dir)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_async_run_survives_a_killed_worker_and_sigterm(tmp_path, init):
    recipe, run_dir = _recipe(tmp_path, init), tmp_path / "run"
    proc = u.start(recipe, run_dir, devices=2)
    _wait(proc, run_dir, lambda r: r["step"] >= 2)
    victim = _workers(proc)[0]
    victim.send_signal(signal.SIGKILL)
    _wait(proc, run_dir, lambda r: r.get("worker_restarts", 0) >= 1)  # Ray restarted it and it asked for work
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
    assert last["regenerated"] >= 1 and last["worker_restarts"] == 1  # the killed worker's lives across both runs
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
