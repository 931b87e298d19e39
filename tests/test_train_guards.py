"""glm5 train guard rails: SIGTERM saves the current step and exits 0; non-finite steps are skipped and
counted, and too many in a row stop the run with its last checkpoint intact; glm5 plot."""

from __future__ import annotations

import signal
import time

import numpy as np

from tests import train_util as u
from tests.conftest import run_cli


def test_sigterm_commits_the_current_step(tmp_path):
    recipe = u.write_recipe(tmp_path / "r.yaml", checkpoint={"interval_steps": None, "max_to_keep": 2})
    run_dir = tmp_path / "run"
    proc = u.start(recipe, run_dir, "stages.0.steps=400")
    u.wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = u.records(run_dir)[-1]["step"]
    assert 3 <= last < 400 and "SIGTERM: saving step" in out
    assert u.committed(run_dir) == [last]  # the step it was at, committed
    assert u.train_state(run_dir, last)["step"] == last


def test_nonfinite_steps_are_skipped_and_stop_the_run(tmp_path):
    recipe = u.write_recipe(tmp_path / "r.yaml", max_nonfinite_in_a_row=3)
    run_dir = tmp_path / "run"
    code, out = u.run(recipe, run_dir, prefix=("-m", "tests.nonfinite_child", "2,5,6,7,8"))
    assert code == 3, out
    assert "glm5: stopped: 3 non-finite steps in a row (steps 5..7" in out
    assert "the last checkpoint (step 6) is intact" in out
    rs = {r["step"]: r for r in u.records(run_dir)}
    assert rs[2]["loss"] is None and rs[3]["loss"] is not None and rs[7]["skipped"] == 4
    assert max(rs) == 7 and u.committed(run_dir) == [3, 6]
    # Skipped steps leave the parameters as they were: step 6 holds step 4's update, and is finite.
    params6 = u.params(run_dir, 6)
    assert all(np.isfinite(v).all() for v in params6.values())
    assert u.train_state(run_dir, 6)["skipped_total"] == 3
    # glm5 plot draws the run's curves.
    assert run_cli("plot", str(run_dir), "--out", str(tmp_path / "c.png")) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_sigterm_during_a_compile_saves_and_exits_at_once(tmp_path):
    """The second stage's step is compiling (no cache for it): SIGTERM saves the step reached and exits 0
    without waiting for the compile; the run then resumes from that step."""
    stages = [{"name": "short", "steps": 3}, {"name": "long", "steps": 3}]
    data = {**u.RECIPE["data_overrides"], "stages.1.seq_len": 48, "stages.1.tokens_per_step": 384}
    recipe = u.write_recipe(tmp_path / "r.yaml", stages=stages, data_overrides=data, compilation_cache=None,
                            checkpoint={"interval_steps": None})
    run_dir = tmp_path / "run"
    proc = u.start(recipe, run_dir)
    lines = []
    for line in proc.stdout:  # wait until the second stage's compile has begun
        lines.append(line)
        if "compiling the 48-token step" in line:
            break
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 0 and time.monotonic() - start < 15, out
    assert "SIGTERM while compiling: saving step 3 and exiting" in out, out
    assert u.committed(run_dir) == [3]
    code, out = u.run(recipe, run_dir)
    assert code == 0 and "resumed from" in out and u.committed(run_dir)[-1] == 6, out
