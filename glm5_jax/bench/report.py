"""What `glm5 bench` prints and writes: the machine, a rich table of every measured figure, the JSON document.

Every cell comes from the result document (`glm5_jax/bench/command.py` assembles it from the parts' own
measurements); a part that did not run has no rows, and a figure that could not be measured shows `-`.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "grain")


def machine() -> dict:
    """CPU model, cores, memory, Python and package versions of this process's machine."""
    import jax
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "python": sys.version.split()[0], "versions": versions, "platform": device.platform,
            "device_kind": device.device_kind, "devices": jax.device_count()}


def _num(x, fmt: str = ",.3f", scale: float = 1.0, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x / scale:{fmt}}{unit}"


def _pct(x) -> str:
    return _num(x, ".1f", 0.01, " %")


def _step_rows(r: dict) -> list[tuple[str, str, str]]:
    c, s, u, f, m = r["compile"], r["step"], r["utilisation"], r["flops"], r["memory"]
    sci = lambda x: _num(x, ".3e")
    mib = lambda x: _num(x, ",.1f", 2**20, " MiB")
    top = list(f["by_scope"].items())[:3]
    return [
        ("compile", f"{c['lower_s']:.1f} s lower + {c['compile_s']:.1f} s compile", "TrainStep.lower / .compile"),
        ("step time", f"median {s['median_s']:.4f} s (min {s['min_s']:.4f}, max {s['max_s']:.4f})",
         f"{s['timed_steps']} timed steps after {s['warmup_steps']} warm-up; batches {s['batches']}"),
        ("tokens/s", _num(s["tokens_per_s"], ",.0f"), f"{s['tokens_per_step']:,.0f} tokens per step / median"),
        ("MFU", _pct(u["mfu"]), f"model FLOPs {sci(u['model_flops_per_step'])} / step time / ({u['devices']} x "
         f"{sci(u['peak_flops_per_device'])} FLOP/s: {u['peak_source']})"),
        ("hardware FLOP util.", _pct(u.get("hfu")), "compiled matmul FLOPs per device / step time / peak"),
        ("compiled FLOPs", sci(f["compiled_per_device"]), f"per device, {f['known_loops']} loops at their trip "
         f"counts, {len(f['dynamic_loops'])} at computed ones; loops once {sci(f['compiled_loops_once_per_device'])}"
         f", XLA cost_analysis {sci(f['xla_cost_analysis_per_device'])}"),
        ("analytic FLOPs", sci(f["analytic_per_device"]), f"per device (plan.measure.step_flops; model parts "
         f"{sci(f['analytic_model_per_device'])})"),
        ("compiled / analytic", _num(f["ratio"], ".3f"), "largest compiled scopes: " +
         ", ".join(f"{k} {v / f['compiled_per_device']:.0%}" for k, v in top)),
        ("memory (compiled)", f"{mib(m['temp_plus_arguments_bytes'])} temp + args",
         f"per device: temp {mib(m['temp_bytes'])}, arguments {mib(m['argument_bytes'])}; peak with outputs "
         f"{mib(m['compiled_peak_bytes'])}"),
        ("memory (process)", f"{mib(m['peak_rss_bytes'])} RSS", f"device peak {mib(m['device_peak_bytes'])} "
         "(memory_stats)"),
    ]


def _data_rows(d: dict, step_tokens_per_s) -> list[tuple[str, str, str]]:
    ratio = None if step_tokens_per_s is None else d["tokens_per_s"] / step_tokens_per_s
    return [("data pipeline", f"{d['tokens_per_s']:,.0f} tokens/s", f"{d['batches']} batches after the first "
             f"({d['first_batch_s']:.2f} s): {d['what']}"),
            ("data / step", _num(ratio, ".2f", unit=" x"), "pipeline tokens/s over the step's (> 1: it keeps up)")]


def _checkpoint_rows(disk: dict, c: dict) -> list[tuple[str, str, str]]:
    mb = lambda x: _num(x, ",.0f", 1e6, " MB/s")
    gb = lambda x: _num(x, ",.3f", 1e9, " GB/s")
    return [
        ("disk write", mb(disk["write_bytes_per_s"]), f"{disk['bytes'] / 1e9:.2f} GB, os.write + fsync; buffered "
         f"{mb(disk['write_buffered_bytes_per_s'])}; in {disk['directory']}"),
        ("disk read", mb(disk["read_bytes_per_s"]), "after posix_fadvise(DONTNEED)"),
        ("checkpoint save", gb(c["save_bytes_per_s"]), f"{_pct(c['save_of_disk_write'])} of disk write; "
         f"{c['state_bytes'] / 1e9:.3f} GB state, {c['disk_bytes'] / 1e9:.3f} GB on disk, synchronous "
         f"{' / '.join(f'{t:.2f}' for t in c['save_times_s'])} s"),
        ("checkpoint restore", gb(c["restore_bytes_per_s"]), f"{_pct(c['restore_of_disk_read'])} of disk read; "
         f"{c['restore_s']:.2f} s, page cache dropped"),
        ("async save stall", f"{c['stall_s']:.3f} s", f"{_pct(c['stall_of_step'])} of a step; write done after "
         f"{' / '.join(f'{t:.2f}' for t in c['async_total_times_s'])} s" +
         (f"; a step during it {' / '.join(f'{t:.3f}' for t in c['step_during_save_times_s'])} s"
          if c["step_during_save_times_s"] else "")),
    ]


def _convert_rows(conv: dict) -> list[tuple[str, str, str]]:
    return [(f"convert {d}", _num(r["bytes_per_s"], ",.3f", 1e9, " GB/s"),
             f"{r['variables_bytes'] / 1e9:.3f} GB of tensors in {r['seconds']:.2f} s; child peak RSS "
             f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB ({r['rss_before_bytes'] / 2**20:,.0f} MiB before converting)")
            for d, r in conv.items()]


def rows(result: dict) -> list[tuple[str, str, str]]:
    """(figure, value, how it was measured) for every part in `result`."""
    out = []
    step = result.get("step")
    if step:
        out += _step_rows(step)
    if result.get("data"):
        out += _data_rows(result["data"], step["step"]["tokens_per_s"] if step else None)
    if result.get("checkpoint"):
        out += _checkpoint_rows(result["disk"], result["checkpoint"])
    if result.get("convert"):
        out += _convert_rows(result["convert"])
    return out


def print_table(result: dict):
    from rich.console import Console
    from rich.table import Table

    b, mach = result["bench"], result["machine"]
    table = Table(title=f"glm5 bench {b['config']} stage {b['stage']} on {mach['devices']} {mach['device_kind']} "
                        f"device(s) ({mach['cpu']}, {mach['cores']} cores)", title_justify="left")
    for col, justify in (("figure", "left"), ("value", "right"), ("how", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for row in rows(result):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def write_json(result: dict, path: str):
    """The result document as JSON (non-finite numbers as null), written atomically."""
    clean = json.loads(json.dumps(result, default=str),
                       parse_constant=lambda c: None)  # NaN / Infinity -> null
    from glm5_jax.checkpoint.outputs import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(clean, f, indent=2)
        f.write("\n")
