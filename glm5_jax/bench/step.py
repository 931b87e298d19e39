"""The step part: compile the stage's train step, time it on real batches, count its FLOPs and memory.

- compile: `TrainStep.lower()` then `TrainStep.compile()` (which lowers again from jax's cache, in
  milliseconds, and compiles: the executable every later call runs), each timed;
- step time: `warmup` steps, then `steps` timed ones, each a different batch of the stage's data pipeline
  (the trainer's `Feed`, read and put on the devices before the timed loop, so the figure is the step's
  alone), each timed from dispatch to the moment its outputs are ready;
- tokens/s and MFU as the trainer computes them (`accounting.analytic.model_flops_per_step`, `peak_flops`);
- FLOPs: the compiled program's matrix products with every loop at its trip count, by `glm5_jax.scopes`
  name (`accounting.compiled`), against the analytic count `glm5 plan` prints (`plan.measure.step_flops`);
- memory: the compiler's buffers (`plan.measure.memory`), this process's peak RSS, and a device's own peak
  where its runtime reports one (GPU / TPU `memory_stats`).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from glm5_jax.accounting import compiled as hlo
from glm5_jax.accounting import loops


def compile_step(bench, out) -> tuple[object, dict]:
    """(compiled executable, {lower_s, compile_s}) of the stage's step."""
    spec = bench.stage.step
    out(f"compiling the step of stage {bench.stage.name}: {spec.accumulate} x {spec.rows} rows x {spec.seq_len} "
        f"tokens on {bench.n_devices} {bench.device.platform} device(s)")
    t0 = time.perf_counter()
    bench.program.lower()
    t1 = time.perf_counter()
    compiled = bench.program.compile()
    t2 = time.perf_counter()
    out(f"  lowered in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s")
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1}


def read_batches(it, stage, n: int) -> list[tuple[dict, int]]:
    """`n` consecutive (global batch, microbatch count) of the stage from the trainer's feed, on the devices."""
    batches = [it.next_batch(stage) for _ in range(n)]
    jax.block_until_ready([b for b, _ in batches])
    return batches


def one_step(bench, state, batch, count: int, index: int) -> tuple[float, float]:
    """Run the train step once on `batch` as the trainer does (learning rate: the stage schedule's at step
    `index`), updating `state` (run_state.TrainState): (seconds from dispatch to ready outputs, loss)."""
    stage = bench.stage
    lr = float(stage.schedule(index))
    t0 = time.perf_counter()
    state.params, state.buffers, state.opt_state, metrics = bench.program(
        state.params, state.buffers, state.opt_state, batch, count, lr, stage.bias_rate)
    jax.block_until_ready((state.params, state.buffers, state.opt_state, metrics))
    return time.perf_counter() - t0, float(metrics["loss"])


def time_steps(bench, state, batches, warmup: int, out) -> dict:
    """Run the step on each batch in turn (the first `warmup` untimed), updating `state` (run_state.TrainState)."""
    stage = bench.stage
    times, losses = [], []
    for i, (batch, count) in enumerate(batches):
        dt, loss = one_step(bench, state, batch, count, i)
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
        out(f"  step {i + 1}/{len(batches)}{' (warm-up)' if i < warmup else ''}: {dt:.3f} s, loss {loss:.4f}")
    counts = [c for _, c in batches[warmup:]]
    tokens = float(np.mean(counts)) * stage.data.micro_rows * stage.data.seq_len
    median = statistics.median(times)
    return {"warmup_steps": warmup, "timed_steps": len(times), "times_s": times, "median_s": median,
            "min_s": min(times), "max_s": max(times), "tokens_per_step": tokens, "tokens_per_s": tokens / median,
            "microbatches": float(np.mean(counts)), "loss_first": losses[0], "loss_last": losses[-1],
            "batches": "real: a different batch of the stage's data pipeline for every step, read and placed on "
                       "the devices before the timed loop"}


def utilisation(bench, step: dict, compiled_flops: float | None) -> dict:
    """MFU as the trainer logs it (model FLOPs of the step's rows over step time x devices x peak), and the
    hardware FLOP utilisation of the compiled program's own matrix products (per device)."""
    from glm5_jax.accounting.analytic import model_flops_per_step
    from glm5_jax.accounting.peak import device_peak

    stage, device = bench.stage, bench.device
    peak = device_peak(bench.recipe.metrics.peak_flops, device)
    source = ("recipe metrics.peak_flops" if bench.recipe.metrics.peak_flops else
              "nominal CPU figure (only comparable to itself)" if device.platform == "cpu" else
              f"accounting.peak.PEAK_FLOPS[{device.device_kind!r}]")
    rows = step["microbatches"] * stage.data.micro_rows
    model = model_flops_per_step(stage.step.model_cfg, bench.run.par, rows, stage.data.seq_len,
                                 bench.program.depths, stage.step.loss_cfg.dsa)
    out = {"model_flops_per_step": model, "peak_flops_per_device": peak, "peak_source": source,
           "device_kind": device.device_kind, "devices": bench.n_devices,
           "mfu": model / step["median_s"] / (peak * bench.n_devices)}
    if compiled_flops is not None:
        out["hfu"] = compiled_flops / step["median_s"] / peak
    return out


def flop_counts(bench, compiled, count: float) -> dict:
    """Compiled matmul FLOPs per device (loops at their trip counts) against the analytic count."""
    from glm5_jax.plan.measure import step_flops, step_inputs, xla_flops

    spec = bench.stage.step
    counted = hlo.count_flops(compiled.as_text(),
                              loops.step_trips(spec, bench.run.par.axis_size("length"), count))
    analytic = step_flops(step_inputs(bench.program, spec.model_cfg, bench.run.opt_base))
    total = sum(f.per_device for f in analytic)
    return {
        "compiled_per_device": counted.flops, "compiled_loops_once_per_device": counted.once,
        "xla_cost_analysis_per_device": xla_flops(compiled), "analytic_per_device": total,
        "analytic_model_per_device": sum(f.per_device for f in analytic if f.model),
        "ratio": counted.flops / total if total else float("nan"),
        "components": [{"name": f.name, "formula": f.formula, "per_device": f.per_device, "model": f.model}
                       for f in analytic],
        "by_scope": counted.by_scope, "by_source": counted.by_source, "known_loops": counted.loops,
        "dynamic_loops": counted.dynamic,
        "uncounted_custom_calls": counted.uncounted,
    }


def memory(bench, compiled) -> dict:
    """The compiler's buffer sizes (per device), this process's peak RSS and the device's own peak if known."""
    from glm5_jax.plan.measure import memory as compiled_memory
    from glm5_jax.plan.measure import peak_rss_bytes, step_inputs

    spec = bench.stage.step
    m = compiled_memory(step_inputs(bench.program, spec.model_cfg, bench.run.opt_base), compiled)
    stats = getattr(bench.device, "memory_stats", lambda: None)() or {}
    return {"argument_bytes": m.argument, "output_bytes": m.output, "alias_bytes": m.alias, "temp_bytes": m.temp,
            "temp_plus_arguments_bytes": m.temp + m.argument, "compiled_peak_bytes": m.peak,
            "params_bytes": m.params_total, "optimizer_bytes": m.optimizer_total,
            "peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": stats.get("peak_bytes_in_use")}


def run_step_part(bench, state, it, steps: int, warmup: int, out) -> tuple[dict, list]:
    """Everything the step part measures, {compile, step, flops, memory, utilisation}, and the batches it ran
    (`state`, run_state.TrainState, is updated by the steps)."""
    compiled, compile_times = compile_step(bench, out)
    out(f"reading {warmup + steps} batches of stage {bench.stage.name}")
    batches = read_batches(it, bench.stage, warmup + steps)
    out(f"running {warmup} warm-up + {steps} timed steps")
    step = time_steps(bench, state, batches, warmup, out)
    out("counting the compiled program's FLOPs")
    flops = flop_counts(bench, compiled, step["microbatches"])
    result = {"compile": compile_times, "step": step, "flops": flops, "memory": memory(bench, compiled),
              "utilisation": utilisation(bench, step, flops["compiled_per_device"])}
    return result, batches
