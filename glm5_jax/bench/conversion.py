"""The convert part: `glm5 convert` of the benchmark's checkpoint, each direction in a child process.

The child (`python -m glm5_jax.bench.conversion DIRECTION SOURCE OUT`) times the conversion call itself
(`glm5_jax.convert.hf.orbax_to_hf` / `hf_to_orbax`, what `glm5 convert` runs) and prints one JSON line with
its own peak RSS: the kernel's high-water mark of the child's memory (`VmHWM` in /proc/self/status), read
before and after converting, so it is the conversion's alone plus the interpreter and its imports. (Not the
parent's `wait4` rusage: Linux carries the parent's peak into a spawned child's `ru_maxrss`.) The rate is
the model's tensors (every variable at its checkpoint dtype) over the conversion's seconds. Children run
with JAX on CPU: conversion is host work, and a child must not claim an accelerator the parent holds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

DIRECTIONS = ("orbax-to-hf", "hf-to-orbax")


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux: VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _convert(direction: str, source: str, out: str) -> dict:
    """Run one conversion in this process: {seconds, variables_bytes, bytes_out, rss_before_bytes,
    peak_rss_bytes}."""
    import numpy as np

    from glm5_jax.checkpoint.store import abstract_leaves
    from glm5_jax.convert.hf import hf_to_orbax, orbax_to_hf

    rss_before = peak_rss()
    t0 = time.perf_counter()
    convert = orbax_to_hf if direction == "orbax-to-hf" else hf_to_orbax
    cfg = convert(source, out, show_progress=False)  # (the model config, as both return)
    seconds = time.perf_counter() - t0
    variables = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in abstract_leaves(cfg).values())
    return {"seconds": seconds, "variables_bytes": variables, "bytes_out": _tree_bytes(out),
            "rss_before_bytes": rss_before, "peak_rss_bytes": peak_rss()}


def run_child(direction: str, source: str, out: str) -> dict:
    """One conversion in a child process: its figures (`_convert`'s) and its wall time with start-up."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "glm5_jax.bench.conversion", direction, source, out], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"{direction} of {source} failed with exit status {proc.returncode}: {tail[0]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures.update({"wall_s": wall, "bytes_per_s": figures["variables_bytes"] / figures["seconds"]})
    return figures


def measure(checkpoint: str, work_dir: str, directions, out) -> dict:
    """Convert `checkpoint` to HF (and, with "hf-to-orbax" in `directions`, that HF directory back)."""
    hf_dir, orbax_dir = os.path.join(work_dir, "hf"), os.path.join(work_dir, "orbax")
    paths = {"orbax-to-hf": (checkpoint, hf_dir), "hf-to-orbax": (hf_dir, orbax_dir)}
    results = {}
    for direction in directions:
        source, target = paths[direction]
        out(f"convert {direction}: {source} -> {target} (child process)")
        results[direction] = run_child(direction, source, target)
    return results


def main(argv: list[str]) -> int:
    direction, source, out = argv
    if direction not in DIRECTIONS:
        raise SystemExit(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    print(json.dumps(_convert(direction, source, out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
