"""Does input loading overlap compute? Step time of the train step fed by the real data pipeline (as `glm5 train`
feeds it: step s dispatched, step s+1's batch read and put on the devices, then step s's metrics read) over
step time with one batch kept on the devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/input_overlap.py \
        [--recipe quickstart] [--steps 20]

Both loops run the same compiled program (the recipe's first stage); a ratio near 1 means the host's data
work hides behind the device's compute.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np


from glm5_jax.checkpoint.naming import flatten
from glm5_jax.data.loader import DataPipeline, global_batch
from glm5_jax.train import recipe as recipe_lib
from glm5_jax.train import step as S
from glm5_jax.train.setup import resolve


def device_batch(local: dict, stage, sharding):
    a, lm = stage.data.accumulate, stage.data.local_micro_rows
    arrays = {k: np.asarray(local[k]).reshape(a, lm, -1) for k in S.BATCH_KEYS}
    return global_batch(arrays, sharding)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    run = resolve(recipe_lib.load(args.recipe))
    stage = run.stages[0]
    program = S.build_step(run, stage)
    t = time.perf_counter()
    program.compile()
    print(f"compiled {stage.step.batch_shape} step of stage {stage.name} in {time.perf_counter() - t:.1f} s")
    state = S.init_sharded(run.model_cfg, run.par)
    params, buffers = flatten(state.params), flatten(state.buffers)
    opt = program.init_optimizer(params)
    pipe = DataPipeline(run.data_cfg, accumulate={s.name: s.data.accumulate for s in run.stages})
    it = pipe.iterator(0)
    count = stage.data.accumulate

    def loop(fetch):
        nonlocal params, buffers, opt
        times, batch, pending = [], fetch(), None
        last = time.perf_counter()
        for _ in range(args.steps):
            params, buffers, opt, m = program(params, buffers, opt, batch, count, 1e-4, 0.0)
            batch = fetch()
            if pending is not None:
                jax.device_get(pending)
                now = time.perf_counter()
                times.append(now - last)
                last = now
            pending = m
        jax.device_get(pending)
        return statistics.median(times[2:])

    real = loop(lambda: device_batch(next(it), stage, program.batch_sharding))
    resident = device_batch(next(it), stage, program.batch_sharding)
    fixed = loop(lambda: resident)
    it.close()
    print(f"median step time: real input pipeline {1000 * real:.1f} ms, device-resident batch {1000 * fixed:.1f} ms, "
          f"ratio {real / fixed:.3f} ({args.steps} steps each, {jax.device_count()} {jax.devices()[0].platform} "
          f"devices)")


if __name__ == "__main__":
    main()
