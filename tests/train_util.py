"""Helpers for the trainer tests: a tiny recipe, `glm5 train` in a child process, reading runs back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

CACHE = os.path.join(tempfile.gettempdir(), "glm5-test-jax-cache")  # persistent XLA cache: children skip compiles

# 2 layers (1 dense, 1 MoE with 8 experts), no MTP, 32-token rows (dense attention): compiles in seconds.
RECIPE = {
    "model": "tiny",
    "model_overrides": {"num_hidden_layers": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0},
    "layout_overrides": {"mesh": {"data": 2, "expert": 2, "tensor": 2}},
    "data": "default",
    "data_overrides": {"stages.0.seq_len": 32, "stages.0.tokens_per_step": 256},
    "optimizer": {"matrix_optimizer": "adamw", "weight_decay": 0.01},
    "losses": {"mtp_weight": 0.0, "bias_update_rate": 0.001},
    "compilation_cache": CACHE,
    "checkpoint": {"interval_steps": 3, "max_to_keep": 5},
    "metrics": {"interval": 1, "tensorboard": True, "progress": False},
    "stages": [{"name": "short", "steps": 12,
                "schedule": {"schedule": "cosine", "learning_rate": 3e-3, "warmup_steps": 3}}],
}


def write_recipe(path, **changes) -> str:
    recipe = json.loads(json.dumps(RECIPE))
    recipe.update(changes)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return str(path)


def child_env(devices: int = 8, **extra) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def start(recipe: str, run_dir, *overrides, devices: int = 8, prefix=("-m", "glm5_jax.cli"), **env) -> subprocess.Popen:
    """`glm5 train` in a child (`prefix`: how to start it, e.g. ("-m", "tests.nonfinite_child", "3"))."""
    cmd = [sys.executable, *prefix, "train", "--config", recipe, f"run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, env=child_env(devices, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run(recipe: str, run_dir, *overrides, devices: int = 8, timeout: float = 240, prefix=("-m", "glm5_jax.cli"),
        **env):
    proc = start(recipe, run_dir, *overrides, devices=devices, prefix=prefix, **env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def records(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_step(proc: subprocess.Popen, run_dir, step: int, timeout: float = 240) -> int:
    """Poll metrics.jsonl until a record of `step` or later is there; returns the latest logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rs = records(run_dir)
        if rs and rs[-1]["step"] >= step:
            return rs[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode} before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir)}


def committed(run_dir) -> list[int]:
    import orbax.checkpoint as ocp

    d = os.path.join(run_dir, "checkpoints")
    return sorted(s for s in ocp.utils.checkpoint_steps(d) if ocp.utils.is_checkpoint_finalized(os.path.join(d, str(s))))


def params(run_dir, step=None) -> dict[str, np.ndarray]:
    from glm5_jax.checkpoint.store import CheckpointReader

    reader = CheckpointReader(os.path.join(run_dir, "checkpoints"), step)
    return {name: reader.open(name).read().result() for name in reader.names}


def train_state(run_dir, step) -> dict:
    with open(os.path.join(run_dir, "checkpoints", str(step), "train", "metadata")) as f:
        return json.load(f)
