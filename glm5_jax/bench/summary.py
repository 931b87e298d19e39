"""BENCHMARKS.md from one `benchmarks/refresh.sh` run: `python -m glm5_jax.bench.summary RESULTS_DIR OUT.md`.

RESULTS_DIR holds `glm5 bench`'s JSON documents (NAME.json), every command's output (NAME.log) and its
"exit-status seconds" (NAME.status). Every number written comes from those files; a run that is missing or
failed is listed with its status instead of figures.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys

from glm5_jax import scopes
from glm5_jax.accounting import parts as P

BENCHES = (("bench-tiny", "tiny (1 device)"), ("bench-quickstart", "quickstart (8 devices)"),
           ("bench-checkpoint", "tiny, 352 MB state (1 device)"))
# The quickstart step (tiny model, 16 x 128 tokens) compiled in five layouts, each changing one thing.
LADDER = (("flops-one", "one device", "the analytic count's own setting: every matmul of the step on one device"),
          ("flops-data8", "data 8", "8 data-parallel devices, no expert axis"),
          ("flops-ep-tiled", "data 2 x expert 2 x tensor 2, tiled", "expert parallelism over 2 devices"),
          ("flops-ep-ragged", "data 2 x expert 2 x tensor 2, ragged_dot", "the same with jax.lax.ragged_dot"),
          ("bench-quickstart", "pipeline 2 x expert 2 x tensor 2 (quickstart)", "the quickstart layout"),
          ("flops-mb4", "the quickstart with 4 microbatches", "the pipeline bubble (M + S - 1) / M: 1.5 -> 1.25"))
SCRIPTS = ("data-throughput", "input-overlap", "generate-speed", "optimizer-compare", "long-context",
           "expert-matmul", "weight-push", "rl-async")
METHOD = [
    "- `glm5 bench` builds each stage's step as `glm5 train` does (`train.setup.resolve`, "
    "`train.step.build_step`, `run_state.restore_or_init`, the trainer's data `Feed`) and times `lower()` and `compile()`, then "
    "2 warm-up and N timed steps on different real batches (median, min, max; each step timed to its ready outputs);",
    "- tokens/s and MFU as the trainer logs them; compiled FLOPs: the matmuls of the optimised HLO with every loop at "
    "its trip count (XLA's `cost_analysis` counts a loop body once), against `glm5 plan`'s analytic count, per device;",
    "- data: the stage's pipeline read as fast as it goes (`Feed.next_batch`, no step); disk: 1 GiB of `os.write` + "
    "`fsync` in the checkpoint folder; checkpoint: `CheckpointManager.save` synchronous (twice, median) and "
    "asynchronous (how long `save` blocks the loop), restore after dropping the page cache; convert: `glm5 convert` "
    "in a child process, its own peak RSS;",
    "- benchmarks/*.py: each script's own output, as printed.",
]
_NOISE = re.compile(r"^([WIE]\d{4} |WARNING: Logging|Token authentication is enabled|Failed to find host bounds|=== Source|learning/|E\d{4}|\s*$)")


def _load(results: str, name: str) -> dict | None:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _status(results: str, name: str) -> str:
    path = os.path.join(results, f"{name}.status")
    if not os.path.exists(path):
        return "not run"
    rc, seconds = open(path).read().split()
    return f"exit status {rc}, {seconds} s"


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _get(doc, *keys):
    for k in keys:
        if not isinstance(doc, dict) or k not in doc:
            return None
        doc = doc[k]
    return doc


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def bench_rows(docs: list) -> list[tuple[str, list[str]]]:
    """(figure, one cell per benchmark) of the glm5 bench runs."""
    g = lambda d, *k: _get(d, *k)
    rows = [
        ("compile: lower + compile", [f"{_f(g(d, 'step', 'compile', 'lower_s'), '.1f')} + "
                                      f"{_f(g(d, 'step', 'compile', 'compile_s'), '.1f')} s" for d in docs]),
        ("step time: median (min-max)", [f"{_f(g(d, 'step', 'step', 'median_s'), '.3f')} s "
                                         f"({_f(g(d, 'step', 'step', 'min_s'), '.3f')}-"
                                         f"{_f(g(d, 'step', 'step', 'max_s'), '.3f')})" for d in docs]),
        ("tokens/s", [_f(g(d, "step", "step", "tokens_per_s"), ",.0f") for d in docs]),
        ("MFU (nominal CPU peak 1e11 FLOP/s per device)", [_pct(g(d, "step", "utilisation", "mfu")) for d in docs]),
        ("compiled / analytic FLOPs per device", [_f(g(d, "step", "flops", "ratio"), ".3f") for d in docs]),
        ("compiled memory: temp + arguments (MiB)",
         [_f(_mib(g(d, "step", "memory", "temp_plus_arguments_bytes")), ",.1f") for d in docs]),
        ("process peak RSS (MiB)", [_f(_mib(g(d, "step", "memory", "peak_rss_bytes")), ",.0f") for d in docs]),
        ("data pipeline tokens/s / step tokens/s", [_ratio(g(d, "data", "tokens_per_s"),
                                                           g(d, "step", "step", "tokens_per_s")) for d in docs]),
        ("disk write, fsync (MB/s)", [_f(_mb(g(d, "disk", "write_bytes_per_s")), ",.0f") for d in docs]),
        ("disk write, buffered / read (MB/s)", [f"{_f(_mb(g(d, 'disk', 'write_buffered_bytes_per_s')), ',.0f')} / "
                                                f"{_f(_mb(g(d, 'disk', 'read_bytes_per_s')), ',.0f')}" for d in docs]),
        ("synchronous save times (s)", [_times(g(d, "checkpoint", "save_times_s")) for d in docs]),
        ("state checkpointed / on disk (MB)", [f"{_f(_mb(g(d, 'checkpoint', 'state_bytes')), ',.1f')} / "
                                               f"{_f(_mb(g(d, 'checkpoint', 'disk_bytes')), ',.1f')}" for d in docs]),
        ("checkpoint save (GB/s, % of disk write)", [_rate(g(d, "checkpoint", "save_bytes_per_s"),
                                                           g(d, "checkpoint", "save_of_disk_write")) for d in docs]),
        ("checkpoint restore (GB/s, % of disk read)", [_rate(g(d, "checkpoint", "restore_bytes_per_s"),
                                                             g(d, "checkpoint", "restore_of_disk_read"))
                                                       for d in docs]),
        ("async save stall (s, % of a step)", [f"{_f(g(d, 'checkpoint', 'stall_s'), '.3f')} "
                                               f"({_pct(g(d, 'checkpoint', 'stall_of_step'))})" for d in docs]),
        ("async save stalls / writes done (s)", [f"{_times(g(d, 'checkpoint', 'stall_times_s'))} / "
                                                 f"{_times(g(d, 'checkpoint', 'async_total_times_s'))}"
                                                 for d in docs]),
        ("a step while the async write runs / median step", [_during(d) for d in docs]),
    ]
    for direction in ("orbax-to-hf", "hf-to-orbax"):
        rows.append((f"convert {direction} (GB/s, child peak RSS MiB)",
                     [_rate(g(d, "convert", direction, "bytes_per_s"), None) +
                      f" ({_f(_mib(g(d, 'convert', direction, 'peak_rss_bytes')), ',.0f')})" for d in docs]))
    return rows


def _mib(x):
    return None if x is None else x / 2**20


def _mb(x):
    return None if x is None else x / 1e6


def _ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:,.1f} x"


def _rate(bps, share) -> str:
    return "-" if bps is None else f"{bps / 1e9:.3g}" + ("" if share is None else f" ({100 * share:.0f} %)")


def _times(xs) -> str:
    return "-" if not xs else " / ".join(f"{x:.3f}" for x in xs)


def _during(d) -> str:
    during, median = _get(d, "checkpoint", "step_during_save_times_s"), _get(d, "step", "step", "median_s")
    if not during or median is None:
        return "-"
    return " / ".join(f"{t / median:.2f}" for t in during)


EXPERTS = P.part(scopes.ROUTED_EXPERTS)  # the routed experts' part


def _experts(doc) -> float:
    return _by_part(doc)[EXPERTS]


def ladder_lines(results: str) -> list[str]:
    lines = ["| layout | what changes | expert matmul | compiled / analytic | routed-expert matmuls, compiled "
             "(share of compiled) | analytic per device |", "|---|---|---|---|---|---|"]
    for name, layout, what in LADDER:
        d = _load(results, name)
        if d is None or "step" not in d:
            lines.append(f"| {layout} | {what} | | {_status(results, name)} | | |")
            continue
        f = d["step"]["flops"]
        lines.append(f"| {layout} | {what} | {d['bench'].get('expert_matmul', '-')} | {f['ratio']:.3f} | "
                     f"{_experts(d):.3e} ({_experts(d) / f['compiled_per_device']:.0%}) | "
                     f"{f['analytic_per_device']:.3e} |")
    return lines


def _analytic(doc, name: str) -> float:
    return next(c["per_device"] for c in doc["step"]["flops"]["components"] if c["name"] == name)


def excess_lines(results: str) -> list[str]:
    """The quickstart's excess over the analytic count, term by term, each factor from the compiled programs."""
    two, four, one = (_load(results, n) for n in ("bench-quickstart", "flops-mb4", "flops-one"))
    if not all(d and "step" in d for d in (two, four, one)):
        return []
    piped = lambda d: P.within(d["step"]["flops"]["by_scope"], scopes.PIPELINE, but=scopes.ROUTED_EXPERTS)
    a, b = piped(two), piped(four)
    bubble = (2 + 2 - 1) / 2  # (M + S - 1) / M of the quickstart: 2 microbatches, 2 stages
    f = two["step"]["flops"]
    excess = f["compiled_per_device"] - f["analytic_per_device"]
    experts = _experts(two) - _analytic(two, "MoE routed experts (active)")
    parts = _by_part(two)
    split = one["step"]["flops"]["analytic_model_per_device"] / f["analytic_model_per_device"]  # (as part_lines)
    mtp, ns = (parts[P.part(s)] - _by_part(one)[P.part(s)] / split
               for s in (scopes.MTP_PROJECTION, scopes.NEWTON_SCHULZ))
    rest = excess - experts - a * (1 - 1 / bubble) - mtp - ns
    return [f"The quickstart's excess, {excess:.3e} FLOPs per device (ratio {f['ratio']:.3f}), term by term:", "",
            f"- routed experts {experts:+.3e}: compiled {_experts(two):.3e}, x{_experts(two) / (_experts(two) - experts):.1f}"
            " the analytic = 4 (XLA:CPU runs ragged_dot densely: every received row through all 4 local experts; "
            "under pipeline x expert parallelism `auto` cannot take the tiled loop on jax 0.10) x 2 (the dropless "
            "capacity buffer holds n_shards x copies rows, half of them empty) x 1.5 (the pipeline bubble);",
            f"- the pipeline bubble {a * (1 - 1 / bubble):+.3e}: the pipelined group's work but its routed experts "
            f"(every product inside `{scopes.PIPELINE}`), {a:.3e} with 2 microbatches and {b:.3e} with 4, "
            f"x{b / a:.3f} = the bubble's "
            f"(4 + 1) / 4 over (2 + 1) / 2 (x{(5 / 4) / bubble:.3f}): every stage computes M + S - 1 iterations for "
            "M microbatches, so 1 / 3 of the group's work here;",
            f"- MTP's input projection {mtp:+.3e} (not divided by the tensor axis) and Muon's Newton-Schulz "
            f"{ns:+.3e}, against the one-device compile divided as the analytic count divides it;",
            f"- the rest {rest:+.3e}: the pipeline always rematerialises its stage compute (the forward runs again "
            f"in the backward; the analytic count has remat none): about {a / bubble / 4:.2e} if the group's "
            f"bubble-free work ({a / bubble:.2e}) is forward + backward (x2) + the recomputed forward; "
            f"{rest - a / bubble / 4:+.2e} is not attributed to a source.", ""]


_COMPILE = re.compile(r"Finished XLA compilation of (\S+) in ([\d.]+) sec")


def quickstart_lines(results: str) -> list[str]:
    """`launch/quickstart.sh` as a user runs it (cold compilation cache, JAX_LOG_COMPILES): the programs XLA
    compiled, their total and the largest."""
    path = os.path.join(results, "quickstart.log")
    if not os.path.exists(path):
        return [f"(not run: {_status(results, 'quickstart')})"]
    compiles = [(m[1], float(m[2])) for m in map(_COMPILE.search, open(path)) if m]
    hits = sum("cache hit" in line for line in open(path))
    lines = [f"`bash launch/quickstart.sh` ({_status(results, 'quickstart')}, all of it: two training runs, export, "
             f"transformers load, `glm5 eval`): {len(compiles)} programs compiled, {sum(s for _, s in compiles):.0f} "
             f"s of XLA compiling in all, {hits} persistent-cache hits (the resumed run's step). The largest:", "",
             "| program | XLA compile (s) |", "|---|---|"]
    return lines + [f"| `{name}` | {sec:.1f} |" for name, sec in sorted(compiles, key=lambda c: -c[1])[:8]]


def target_lines(results: str) -> list[str]:
    """The brief's targets, each with the figure that decides it (or why there is none)."""
    verdict = lambda ok: "met" if ok else "NOT met"
    lines = []
    for name, label in BENCHES[:2]:
        ratio = _get(_load(results, name), "step", "flops", "ratio")
        if ratio is not None:
            why = "" if ratio <= 1.10 else " (the excess term by term: below)"
            lines.append(f"- compiled / analytic FLOPs within 1.10, {label}: {ratio:.3f}, {verdict(ratio <= 1.10)}{why}")
    c = _get(_load(results, "bench-checkpoint"), "checkpoint")
    if c is not None:
        lines.append(f"- checkpoint save >= 70 % of the disk's fsynced write rate (352 MB state): "
                     f"{100 * c['save_of_disk_write']:.0f} %, {verdict(c['save_of_disk_write'] >= 0.7)}")
        if c.get("stall_of_step") is not None:
            lines.append(f"- async save stall <= 5 % of a step (352 MB state): {100 * c['stall_of_step']:.1f} %, "
                         f"{verdict(c['stall_of_step'] <= 0.05)}")
    path = os.path.join(results, "quickstart.log")
    if os.path.exists(path):
        text = open(path).read()
        walls = [float(x) for x in re.findall(r"compiled in ([\d.]+) s", text)]
        total = re.search(r"quickstart ok in (\d+) s", text)
        if walls:
            lines.append(f"- every quickstart program compiles in under 30 s: the slowest {max(walls):.1f} s (the "
                         f"trainer's wall clock, lowering included), {verdict(max(walls) < 30)}")
        if total:
            lines.append(f"- the quickstart under 3 minutes: {total[1]} s by its own clock (after the venv check), "
                         f"{verdict(int(total[1]) < 180)}")
    return lines or ["(no run measured them)"]


def source_lines(doc: dict | None, top: int = 12) -> list[str]:
    """The largest compiled scope paths of a run next to its analytic components (per device)."""
    if doc is None or "step" not in doc:
        return ["(not measured)"]
    f = doc["step"]["flops"]
    lines = ["| compiled: scopes the matmul ran in (HLO metadata) | FLOPs | analytic: component | FLOPs |",
             "|---|---|---|---|"]
    sources, parts = list(f["by_scope"].items())[:top], f["components"]
    for i in range(max(len(sources), len(parts))):
        src = f"`{sources[i][0]}` | {sources[i][1]:.3e}" if i < len(sources) else " | "
        part = f"{parts[i]['name']} | {parts[i]['per_device']:.3e}" if i < len(parts) else " | "
        lines.append(f"| {src} | {part} |")
    lines.append(f"| total | {f['compiled_per_device']:.3e} | total | {f['analytic_per_device']:.3e} |")
    return lines


def _by_part(doc: dict) -> dict[str, float]:
    return P.by_part(doc["step"]["flops"]["by_scope"])


def part_lines(one: dict | None, multi: dict | None) -> list[str]:
    """Compiled FLOPs per device by model part: the quickstart layout against the one-device compile of the
    same step divided as the analytic count divides the model's work (a perfect split of the same program)."""
    if one is None or multi is None or "step" not in one or "step" not in multi:
        return ["(not measured)"]
    split = one["step"]["flops"]["analytic_model_per_device"] / multi["step"]["flops"]["analytic_model_per_device"]
    a, b = _by_part(one), _by_part(multi)
    lines = [f"| model part | quickstart, per device | one device / {split:.0f} | excess |", "|---|---|---|---|"]
    for part in a:
        if a[part] or b[part]:
            lines.append(f"| {part} | {b[part]:.3e} | {a[part] / split:.3e} | {b[part] - a[part] / split:+.3e} |")
    excess = sum(b.values()) - sum(a.values()) / split
    lines.append(f"| total | {sum(b.values()):.3e} | {sum(a.values()) / split:.3e} | {excess:+.3e} |")
    terms = sorted(((b[p] - a[p] / split, p) for p in a), reverse=True)[:3]
    lines += ["", "Largest excess terms: " + "; ".join(f"{p} {x:+.2e} ({x / excess:.0%} of the excess)"
                                                     for x, p in terms) + "."]
    return lines


def machine_lines(doc: dict) -> list[str]:
    m = doc["machine"]
    v = m["versions"]
    return [f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.1f} GiB memory",
            f"- Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]


def script_lines(results: str) -> list[str]:
    out = []
    for name in SCRIPTS:
        path = os.path.join(results, f"{name}.log")
        out += [f"### benchmarks/{name.replace('-', '_')}.py ({_status(results, name)})", "", "```"]
        if os.path.exists(path):
            out += [line.rstrip() for line in open(path) if not _NOISE.match(line)]
        out += ["```", ""]
    return out


def render(results: str) -> str:
    docs = [_load(results, name) for name, _ in BENCHES]
    first = next((d for d in docs if d is not None), None)
    lines = ["# Benchmarks", "",
             f"Written by `bash benchmarks/refresh.sh` on {datetime.date.today().isoformat()}: every figure below "
             "was measured in that one run, on one machine (outputs in `runs/benchmarks/`); how each is measured: "
             "[docs/bench.md](docs/bench.md). The machine is a shared 2-core CPU: absolute timings are noisy and "
             "only comparable within a run, so the CPU figures that carry over are the ratios (compiled / analytic "
             "FLOPs, data / step tokens, checkpoint / disk rates, stall / step time). CPU MFU is against a nominal "
             "1e11 FLOP/s per device and only comparable to itself.", "", "## Method", ""] + METHOD + ["",
             "## Machine", ""]
    lines += machine_lines(first) if first else ["(no glm5 bench run succeeded)"]
    lines += ["", "## glm5 bench", "", "| figure | " + " | ".join(label for _, label in BENCHES) + " |",
              "|---|" + "---|" * len(BENCHES)]
    lines.append("| run | " + " | ".join(_status(results, n) for n, _ in BENCHES) + " |")
    lines += [f"| {fig} | " + " | ".join(cells) + " |" for fig, cells in bench_rows(docs)]
    lines += ["", "## Targets", ""] + target_lines(results)
    lines += ["", "## Compiled FLOPs layout by layout (the quickstart step)", "",
              "The same step (tiny model, 16 rows x 128 tokens, MTP 3 depths, Muon-Split) compiled in five "
              "layouts; compiled FLOPs count every loop at its trip count (docs/bench.md). The routed-expert column "
              f"sums the compiled FLOPs traced in the scope `{scopes.ROUTED_EXPERTS}` (the MoE's grouped matmul).",
              ""]
    lines += ladder_lines(results)
    lines += [""] + excess_lines(results)
    lines += ["", "The quickstart's compiled FLOPs by model part (the innermost part scope, `glm5_jax.scopes`, that "
              "each matmul's HLO metadata names), against the one-device compile of the same step divided by the "
              "analytic count's split of the work (what a perfect split of that program would leave each device):", ""]
    lines += part_lines(_load(results, "flops-one"), _load(results, "bench-quickstart"))
    lines += ["", "The quickstart's compiled FLOPs by scope path, next to the analytic components (per device):", ""]
    lines += source_lines(_load(results, "bench-quickstart"))
    lines += ["", "## The quickstart", ""] + quickstart_lines(results)
    lines += ["", "## benchmarks/*.py", ""] + script_lines(results)
    lines += ["## GPU", "", "No GPU has been lent to this repository's benchmark runs yet. On a machine with one "
              "NVIDIA H200 (Python 3.12 and jax with CUDA installed; what it lacks, such as grain, as wheels carried "
              "in `shared/wheels/`, `wheels/` or `.whl/`), `bash benchmarks/device.sh` runs, in about 8 minutes: "
              "`glm5 bench` on the GLM-5 proxy's step (configs/recipes/glm5-proxy-1gpu.yaml: the released per-layer "
              "shapes, 1 dense + 2 MoE layers of 16 experts + MTP), long_context.py sparse at 4K-128K and dense at "
              "4K and 8K, expert_matmul.py (ragged_dot against the tiled loop) at the proxy's expert shapes and the "
              "checkpoint part with the 352 MB state, and writes JSON under `$OUT` (default `./device-results`); "
              "docs/bench.md, \"A GPU\".", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    results, out = argv
    text = render(results)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
