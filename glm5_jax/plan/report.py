"""What `glm5 plan` prints: the memory and FLOPs tables of one step, and the table of a recipe's stages."""

from __future__ import annotations

import sys

from glm5_jax.accounting import analytic as F
from glm5_jax.plan.devices import GIB, versions
from glm5_jax.plan.measure import PlanResult


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:,.2f} GiB"


def _sci(x: float) -> str:
    return f"{x:.3e}"


def verdict(result: PlanResult) -> str:
    """`fits (12.3 GiB free, 12.8% of the device)`, `DOES NOT FIT (4.1 GiB over)`, or the compiler's out-of-memory
    message."""
    if result.error is not None:
        return f"DOES NOT FIT: the compiler: {result.error}"
    if result.device_memory is None:
        return f"fits (the compiler accepted it; no HBM figure for {result.inputs.par.mesh.devices.flat[0].device_kind})"
    headroom = result.device_memory - result.memory.peak
    if headroom >= 0:
        return f"fits ({_gib(headroom)} free, {headroom / result.device_memory:.1%} of the device)"
    return f"DOES NOT FIT ({_gib(-headroom)} over)"


def short_verdict(result: PlanResult) -> str:
    """The stage table's `fits` cell: yes / no with the headroom, or no with the compiler's message."""
    if result.error is not None:
        return f"no: {result.error}"
    if result.device_memory is None:
        return "yes (the compiler accepted it)"
    headroom = result.device_memory - result.memory.peak
    if headroom < 0:
        return f"no ({_gib(-headroom)} over)"
    return f"yes ({_gib(headroom)} free, {headroom / result.device_memory:.1%})"


def compiler(result: PlanResult) -> str:
    """Which compiler gave the figures: XLA:CPU (simulated devices), libtpu's TPU compiler or XLA's GPU compiler,
    and versions."""
    if result.target.is_tpu:
        return f"TPU compiler ({result.target.name} = {result.target.topology}; {versions()})"
    if result.target.platform == "gpu":
        from glm5_jax.plan import gpus

        shape = gpus.topology(result.target.gpu[1])
        return f"GPU compiler ({result.target.name} = {shape} slices x hosts x GPUs; {gpus.versions()})"
    return "XLA:CPU on simulated devices (an upper bound)"


def memory_table(result: PlanResult):
    """Rich table: analytic split, the compiler's buffers, peak vs device memory."""
    from rich.table import Table

    m, n = result.memory, result.inputs.par.mesh.size
    t = Table(title="per-device memory", title_justify="left")
    for col, justify in (("item", "left"), ("per device", "right"), ("source", "left")):
        t.add_column(col, justify=justify, no_wrap=True)
    t.add_row("parameters", _gib(m.params), f"analytic: {m.params:,} B per device ({_gib(m.params_total)} in all)")
    t.add_row("optimizer state", _gib(m.optimizer),
              f"analytic: {m.optimizer:,} B per device ({_gib(m.optimizer_total)} in all)")
    t.add_row("router bias + batch", _gib(m.buffers + m.batch), f"analytic: {m.buffers + m.batch:,} B per device")
    t.add_row("arguments", _gib(m.argument), "memory_analysis")
    t.add_row("outputs", _gib(m.output), "memory_analysis")
    t.add_row("aliased (donated params + opt)", _gib(None if m.alias is None else -m.alias), "memory_analysis")
    t.add_row("temporaries (activations, grads)", _gib(m.temp), "memory_analysis")
    t.add_row("peak = args + outputs - alias + temp", _gib(m.peak), "memory_analysis", style="bold")
    colour = "green" if result.fits else "red"
    t.add_row("device memory", _gib(result.device_memory), f"[{colour}]{verdict(result)}[/] ({n} devices)",
              style="bold")
    return t


def flops_table(result: PlanResult):
    """Rich table: analytic FLOPs per component, per step and per device, next to cost_analysis."""
    from rich.table import Table

    t = Table(title="FLOPs per step", title_justify="left")
    for col, justify in (("component", "left"), ("formula", "left"), ("all devices", "right"),
                         ("per device", "right"), ("loop trips", "right"), ("per device, loops once", "right")):
        t.add_column(col, justify=justify, no_wrap=True)
    for f in result.flops:
        t.add_row(f.name, f.formula, _sci(f.flops), _sci(f.per_device), f"{f.loops:.4g}", _sci(f.per_device / f.loops))
    model = [f for f in result.flops if f.model]
    t.add_row("model FLOPs (6 N T + attention)", "", _sci(sum(f.flops for f in model)),
              _sci(sum(f.per_device for f in model)), "", "", style="bold")
    t.add_row("analytic total (+ optimizer, remat)", "", _sci(sum(f.flops for f in result.flops)),
              _sci(per_device_total(result.flops)), "", _sci(loops_once(result.flops)), style="bold")
    t.add_row("XLA cost_analysis", "per-device program", "", _sci(result.xla_flops), "", "", style="bold")
    if result.counted is not None:
        t.add_row("compiled matmuls", "HLO walked, loops at their trip counts", "", _sci(result.counted.flops), "",
                  _sci(result.counted.once), style="bold")
    return t


def flops_cells(result: PlanResult) -> tuple[str, str]:
    """(analytic FLOPs per device, compiled matmul FLOPs per device / analytic) of one step."""
    total = per_device_total(result.flops)
    if result.counted is None or not total:
        return _sci(total), "-"
    return _sci(total), f"{_sci(result.counted.flops)} ({result.counted.flops / total:.3f})"


def per_device_total(flops: list[F.Flops]) -> float:
    return sum(f.per_device for f in flops)


def loops_once(flops: list[F.Flops]) -> float:
    """What a cost analysis that counts every loop body once should see of the analytic count, per device."""
    return sum(f.per_device / f.loops for f in flops)


def notes(result: PlanResult) -> list[str]:
    """The lines printed under the tables: what the numbers mean and where they differ."""
    from glm5_jax.model import layer_groups

    cfg = result.inputs.cfg
    total = per_device_total(result.flops)
    ratio = result.xla_flops / total if total else float("nan")
    once = loops_once(result.flops)
    tokens = result.global_batch * result.seq_len
    n_active = F.active_params(cfg)
    scans = ", ".join(f"{g.count} {'MoE' if g.moe else 'dense'}" for g in layer_groups(cfg))
    work = F.work_of(cfg, result.inputs.par, result.inputs.params)
    lines = [(f"N (active params per token, no embedding/MTP) = {n_active:,}; T = {result.global_batch} x "
              f"{result.seq_len} = {tokens:,} tokens; 6 N T = {6 * n_active * tokens:.3e}.")]
    lines.append(f"cost_analysis / analytic per device = {ratio:.3f}. The cost analysis counts every loop body "
                 f"once: the layer scans ({scans} layers), the accumulation loop, the query-block lax.map of "
                 "sparse attention, the tiled expert loop; so it sees about the 'loops once' figure "
                 f"({once:.3e}), plus the elementwise work (norms, softmax, optimizer) the analytic count leaves out.")
    dispatch = f", dispatch {work.dispatch}" if work.dispatch else ""
    lines.append(f"Compiled by {compiler(result)}: experts run {work.expert_matmul}{dispatch} as the model "
                 f"chooses for {result.inputs.par.platform} devices. Parameters {cfg.param_dtype}, compute "
                 f"{cfg.dtype}, remat {cfg.remat_policy}.")
    if result.counted is not None:
        dynamic = ", ".join(sorted({d["scope"] or "unscoped" for d in result.counted.dynamic}))
        lines.append(f"compiled / analytic per device = {result.counted.flops / total:.3f}: the matrix products of "
                     "the compiled program, every loop at its trip count (loops without one: "
                     f"{dynamic or 'none'}, counted as glm5_jax/accounting/loops.py says).")
    elif result.target.is_tpu:
        lines.append("No compiled count on a TPU target: the TPU compiler's optimized program keeps no loop trip "
                     "counts and runs the expert and attention kernels as custom calls; plan the same stage with "
                     "--target gpu:... or cpu for one.")
    lines.append(f"lower {result.lower_s:.1f} s, compile {result.compile_s:.1f} s, peak RSS of this process "
                 f"{result.peak_rss / GIB:.2f} GiB.")
    return lines


def console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 260)


def print_report(result: PlanResult, out=None):
    from glm5_jax.sharding.mesh import describe

    out = out or console()
    cfg = result.inputs.cfg
    pc = result.inputs.par.config
    spec = result.inputs.step.spec
    out.print(f"[bold]plan[/]: {cfg.num_hidden_layers} layers, mesh {describe(result.inputs.par.mesh)}, "
              f"global batch {result.global_batch} x seq {result.seq_len} as {spec.accumulate} microbatch(es), "
              f"pipeline microbatches {pc.microbatches}, expert dispatch {pc.expert_dispatch}, capacity factor "
              f"{pc.capacity_factor}, dsa {spec.loss_cfg.dsa}, trainable {spec.trainable}, "
              f"objective {spec.objective}, qat {spec.model_cfg.qat}")
    out.print(memory_table(result))
    out.print(flops_table(result))
    for line in notes(result):
        out.print(line, highlight=False)


def stage_table(rows):
    """Rich table: one row per recipe stage (`glm5_jax.plan.stages.StagePlan`)."""
    from rich.table import Table

    t = Table(title="stages", title_justify="left")
    for col, justify in (("stage", "left"), ("layout", "left"), ("sequence", "right"), ("rows per step", "right"),
                         ("accumulation", "right"), ("dsa / trainable", "left"), ("per-device peak", "right"),
                         ("fits", "left"), ("FLOPs a device", "right"), ("compiled (/ analytic)", "right"),
                         ("time", "right")):
        t.add_column(col, justify=justify, no_wrap=col not in ("layout", "fits"))
    for r in rows:
        time_s = f"{r.seconds:.0f} s"
        if r.result is None:
            t.add_row(r.name, r.layout, "", "", "", "", "", f"[red]no: {r.error}[/]", "", "", time_s)
            continue
        res = r.result
        colour = "green" if res.fits else "red"
        t.add_row(r.name, r.layout, f"{r.seq_len:,}", f"{r.rows:,}", f"{r.accumulate} x {r.micro_rows}",
                  f"{r.dsa} / {r.trainable}", _gib(res.memory.peak), f"[{colour}]{short_verdict(res)}[/]",
                  *flops_cells(res), time_s)
    return t


def print_stage_row(row, out=None):
    """A line as each stage is done (a stage's compile can take minutes)."""
    out = out or console()
    if row.result is None:
        out.print(f"stage {row.name}: no plan: {row.error}", highlight=False)
    else:
        by = f"; {compiler(row.result)}" if row.result.target.compile_only else ""
        analytic, counted = flops_cells(row.result)
        out.print(f"stage {row.name}: {row.seq_len:,} x {row.rows:,} rows ({row.accumulate} x {row.micro_rows}), "
                  f"peak {_gib(row.result.memory.peak)}: {verdict(row.result)}; FLOPs a device: analytic {analytic}, "
                  f"compiled {counted}; {row.seconds:.0f} s{by}", highlight=False)
    sys.stdout.flush()


def print_stages(rows, target_line: str, out=None):
    out = out or console()
    out.print(stage_table(rows))
    out.print(target_line, highlight=False)
