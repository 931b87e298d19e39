"""Weight push throughput of asynchronous RL (glm5_jax/rl/weights.py) against a plain host memory copy.

A push is `publish` in the trainer (named arrays into Ray's object store, in buckets of at most B MiB) and
`fetch` in a rollout worker's process (the buckets into fresh arrays of the named shapes). The state pushed is
`--mb` MiB of float32 arrays of a model's mix of sizes; each figure is the median of `--repeats` pushes, next
to `np.copyto` of the same bytes in one process, into new arrays (a fetch's case: their pages are faulted in
as they are written) and into already mapped ones (the memory bandwidth a push is bound by).

    .venv/bin/python benchmarks/weight_push.py [--mb 1024] [--buckets 16,64,256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def model_like(mb: int, seed: int = 0) -> dict[str, np.ndarray]:
    """About `mb` MiB of float32 arrays: a quarter in one large matrix (an embedding), the rest in 8 MiB ones."""
    rng = np.random.default_rng(seed)
    total = mb * 2**20 // 4
    named = {"params:embed": rng.standard_normal(total // 4, np.float32)}
    left, i = total - total // 4, 0
    while left > 0:
        n = min(left, 2 * 2**20)
        named[f"params:layer{i}"] = rng.standard_normal(n, np.float32)
        left, i = left - n, i + 1
    return named


def memcpy_s(named: dict[str, np.ndarray]) -> tuple[float, float]:
    """Seconds to copy `named` into new arrays (whose pages the copy faults in, as a fetch's do), then again
    into the same, already mapped ones."""
    out = {k: np.empty_like(v) for k, v in named.items()}
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for k, v in named.items():
            np.copyto(out[k], v)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


class Reader:
    """A rollout worker's side of a push (a Ray actor)."""

    def fetch_s(self, refs, like) -> float:
        from glm5_jax.rl.weights import fetch

        start = time.perf_counter()
        fetch(refs, like)
        return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--buckets", default="16,64,256", help="bucket sizes (MiB), comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from glm5_jax.rl import cluster, weights

    import ray

    cluster.start(num_cpus=2)
    try:
        named = model_like(args.mb)
        size = sum(v.nbytes for v in named.values())
        like = {k: (v.shape, v.dtype) for k, v in named.items()}
        reader = ray.remote(Reader).options(num_cpus=1).remote()
        ray.get(reader.fetch_s.remote(weights.publish({"x": np.zeros(1)}, 8), {"x": ((1,), np.float64)}))
        print(f"{platform.machine()}, {os.cpu_count()} cores, ray {ray.__version__}; {size / 2**20:.0f} MiB in "
              f"{len(named)} arrays, median of {args.repeats}")
        fresh, copy = (float(x) for x in np.median([memcpy_s(named) for _ in range(args.repeats)], axis=0))
        print(f"np.copyto in one process: into new arrays {fresh:.3f} s = {size / fresh / 1e9:.2f} GB/s, into "
              f"mapped ones {copy:.3f} s = {size / copy / 1e9:.2f} GB/s (the column below)")
        print("| bucket | objects | publish (trainer) | fetch (worker) | push | push / memcpy |")
        print("|---|---|---|---|---|---|")
        for mib in (int(b) for b in args.buckets.split(",")):
            pub, fet = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                refs = weights.publish(named, mib * 2**20)
                pub.append(time.perf_counter() - start)
                fet.append(ray.get(reader.fetch_s.remote(refs, like)))
                del refs
            pub_s, fetch_s = float(np.median(pub)), float(np.median(fet))
            push = pub_s + fetch_s
            print(f"| {mib} MiB | {-(-size // (mib * 2**20))} | {pub_s:.3f} s ({size / pub_s / 1e9:.2f} GB/s) | "
                  f"{fetch_s:.3f} s ({size / fetch_s / 1e9:.2f} GB/s) | {size / push / 1e9:.2f} GB/s | "
                  f"{copy / push:.2f} |")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
