"""Synchronous against asynchronous RL on long-tailed response lengths: wall time, trainer busy fraction and
rollout busy fraction for runs that train the same number of samples (docs/rl-async.md, "Measured").

A fresh 2-layer tiny GLM-5 (`glm5 init`) learns GRPO + IcePop on prompts whose response budgets
(`max_new_tokens` per prompt) follow a Pareto law: most answers are cut after a few tokens, a few run to the
cap. The synchronous run generates each step's batch on the trainer's devices and then trains; the
asynchronous runs generate on Ray rollout workers (one CPU device each) while the trainer trains. Every run
is `glm5 train` of the same recipe but for `rl.asynchronous`, and trains `--steps` x samples-per-step.

- wall: from the result of step `--skip` to the last one's (each configuration first runs 3 steps to fill the
  compilation cache of its trainer and workers; the first steps of the measured run also start the workers),
  and the whole command's;
- trainer busy: 1 - (time the trainer waited for rollouts) / (time between step results): synchronous, the
  batch's generation and scoring (`generate_s` + `reward_s`); asynchronous, the wait for a ready batch
  (`wait_s`);
- rollout busy: the share of the run that generation ran: synchronous, `generate_s` over the wall;
  asynchronous, the workers' decoding time over their lifetime (`rollout_busy`).

    .venv/bin/python benchmarks/rl_async.py [--steps 30] [--workers 1,2] [--out runs/benchmarks/rl-async]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import yaml

WORDS = ["apple", "river", "stone", "green", "light", "cloud", "table", "music", "paper", "bread", "ocean",
         "tiger", "house", "dance", "water", "smile"]


def prompts(path: str, count: int, cap: int, seed: int) -> list[int]:
    """`count` prompts, each with a response budget from a Pareto law (shape 1.2, at least 4, at most `cap`)."""
    rng = np.random.default_rng(seed)
    budgets = np.minimum(cap, np.floor(4 * (1 + rng.pareto(1.2, count)))).astype(int)
    with open(path, "w") as f:
        for i, b in enumerate(budgets):
            w = WORDS[i % len(WORDS)]
            f.write(json.dumps({"prompt": f"Say {w} {i}", "answer": w, "max_new_tokens": int(b)}) + "\n")
    return budgets.tolist()


def recipe(out: str, init: str, data: str, steps: int, cap: int, workers: int, cache: str) -> str:
    rl = {"group_size": 4, "max_new_tokens": cap, "reward": "similarity", "reward_workers": 1, "eval_prompts": 4}
    if workers:
        rl["asynchronous"] = {"workers": workers, "max_staleness": 2, "push_every": 1, "segment_tokens": 32}
    doc = {"model": None, "init_from": init, "data": data, "layout": None, "devices": 1,
           "optimizer": {"matrix_optimizer": "adamw", "weight_decay": 0.0},
           "losses": {"mtp_weight": 0.0, "balance_weight": 0.0, "bias_update_rate": 0.0},
           "run_dir": os.path.join(out, f"run-{workers}"), "seed": 0, "compilation_cache": cache,
           "checkpoint": {"interval_steps": steps}, "metrics": {"interval": 1, "progress": False},
           "eval": {"holdout": 0.05, "interval_steps": steps, "at_start": False},
           "stages": [{"name": "rl", "objective": "grpo", "trainable": "no_indexer", "steps": steps,
                       "schedule": {"schedule": "constant", "learning_rate": 1e-3}, "rl": rl}]}
    path = os.path.join(out, f"recipe-{workers}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def measure(path: str, run_dir: str, workers: int, skip: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for warm in (True, False):  # (a first run of 3 steps fills the compilation cache of the trainer and workers)
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "glm5_jax.cli", "train", "--config", path,
                               *(["stages.0.steps=3"] if warm else [])], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            print(proc.stdout[-4000:])
            raise SystemExit(f"glm5 train ({path}) exited with status {proc.returncode}")
    command = time.perf_counter() - start
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "step_time" in r]
    timed = steps[skip:]  # (the first steps: programs read back, the workers starting)
    wall = sum(r["step_time"] for r in timed)
    if workers:
        waited = sum(r["wait_s"] for r in timed)
        rollout = steps[-1]["rollout_busy"]
    else:
        waited = sum(r["generate_s"] + r["reward_s"] for r in timed)
        rollout = sum(r["generate_s"] for r in timed) / wall
    return {"command_s": command, "wall_s": wall, "steps": len(timed), "trainer_busy": 1 - waited / wall,
            "rollout_busy": rollout, "samples": sum(r["rows"] for r in timed),
            "staleness_mean": float(np.mean([r.get("staleness_mean", 0.0) for r in timed])),
            "dropped_stale": steps[-1].get("dropped_stale", 0), "reward_mean": float(np.mean(
                [r["reward_mean"] for r in timed[-10:]]))}


def _name(workers: int) -> str:
    return "synchronous" if not workers else f"asynchronous, {workers} worker{'s' * (workers > 1)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", default="1,2", help="rollout worker counts of the asynchronous runs")
    p.add_argument("--cap", type=int, default=96, help="the longest response budget (tokens)")
    p.add_argument("--skip", type=int, default=4, help="first steps left out of the steady-state figures")
    p.add_argument("--override", action="append", default=[], help="a `glm5 init` model override (repeatable)")
    p.add_argument("--out", default="runs/benchmarks/rl-async")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    init = os.path.join(out, "init")
    subprocess.run([sys.executable, "-m", "glm5_jax.cli", "init", "--config", "tiny", "--out", init, "--override",
                    "num_hidden_layers=2", "--override", "first_k_dense_replace=1",
                    *[a for o in args.override for a in ("--override", o)]], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    budgets = prompts(os.path.join(out, "prompts.jsonl"), 256, args.cap, seed=0)
    seq_len = 32 + args.cap  # (prompt and response)
    data = os.path.join(out, "data.yaml")
    with open(data, "w") as f:
        yaml.safe_dump({"tokenizer": {"kind": "bytes"},
                        "sources": {"p": {"kind": "jsonl", "format": "prompts",
                                          "paths": [os.path.join(out, "prompts.jsonl")]}},
                        "stages": [{"name": "rl", "seq_len": seq_len, "tokens_per_step": 16 * seq_len,
                                    "tokens": 16 * seq_len * args.steps, "mixture": {"p": 1.0}}], "seed": 0}, f)
    q = np.percentile(budgets, [50, 90, 99])
    model = ", ".join(["2 layers", *args.override])
    print(f"{os.cpu_count()} cores; tiny GLM-5 ({model}), GRPO + IcePop, 16 samples a step (4 prompts x 4), "
          f"{args.steps} steps; response budgets: median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, cap "
          f"{args.cap} tokens")
    cache = os.path.join(out, "jax-cache")
    rows = []
    for workers in [0] + [int(w) for w in args.workers.split(",")]:
        path = recipe(out, init, data, args.steps, args.cap, workers, cache)
        r = measure(path, os.path.join(out, f"run-{workers}"), workers, args.skip)
        rows.append((workers, r))
        print(f"  {_name(workers)}: {r['command_s']:.0f} s command", flush=True)
    print(f"| run | samples | wall (steps {args.skip + 1}..) | s/step | trainer busy | rollout busy | staleness | "
          "reward (last 10) |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0][1]["wall_s"]
    for workers, r in rows:
        print(f"| {_name(workers)} | {r['samples']} | {r['wall_s']:.1f} s ({base / r['wall_s']:.2f}x) | "
              f"{r['wall_s'] / r['steps']:.2f} | {100 * max(0.0, r['trainer_busy']):.0f}% | "
              f"{100 * min(1.0, r['rollout_busy']):.0f}% | "
              f"{r['staleness_mean']:.2f} (dropped {r['dropped_stale']}) | {r['reward_mean']:.3f} |")
    with open(os.path.join(out, "rl-async.json"), "w") as f:
        json.dump({str(w): r for w, r in rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
