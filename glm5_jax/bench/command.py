"""`glm5 bench`: its options and their checks (one line, exit 2, before JAX starts), then the parts it runs.

    glm5 bench --config RECIPE [--stage S] [--steps N] [--parts step,data,checkpoint,convert] [--json OUT]
               [KEY=VALUE ...]

Every figure is measured in this run (docs/bench.md says how); the parts are independent and selectable, so a
quick run takes one (`--parts step`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from glm5_jax.checkpoint.outputs import check_output
from glm5_jax.errors import ConfigError

PARTS = ("step", "data", "checkpoint", "convert")
DIRECTIONS = ("orbax-to-hf", "hf-to-orbax")


def _listed(flag: str, text: str, allowed) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in allowed]
    if bad or not items:
        raise ConfigError(f"{flag}: {bad[0] if bad else 'nothing'} is not allowed; give a comma-separated list "
                          f"of {', '.join(allowed)}")
    return [p for p in allowed if p in items]


def check(args) -> dict:
    """The options as plain values, every bad one a `ConfigError` naming the flag and what is allowed."""
    from glm5_jax.plan.devices import parse_bytes

    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--data-batches", args.data_batches, 1)):
        if value < least:
            raise ConfigError(f"{flag}: must be an integer >= {least}; got {value}")
    disk = parse_bytes(args.disk_bytes, "--disk-bytes")
    if disk < 1 << 20:
        raise ConfigError(f"--disk-bytes: must be at least 1MiB; got {args.disk_bytes}")
    directions = _listed("--convert-directions", args.convert_directions, DIRECTIONS)
    if "hf-to-orbax" in directions and "orbax-to-hf" not in directions:
        raise ConfigError("--convert-directions: hf-to-orbax converts the orbax-to-hf output; list both")
    if args.work_dir is not None and not os.path.isdir(args.work_dir):
        raise ConfigError(f"--work-dir: {args.work_dir} is not a directory")
    check_output(args.work_dir or tempfile.gettempdir(), "--work-dir", directory=True, inside=True)
    if args.json is not None:
        check_output(args.json, "--json")
    return {"parts": _listed("--parts", args.parts, PARTS), "disk_bytes": disk, "directions": directions}


def devices_ready(n: int | None) -> bool:
    """Arrange `n` simulated CPU devices when JAX runs on CPU (False: a fresh process must make them);
    on an accelerator the recipe's devices must exist (`resolve` says so when they do not)."""
    if n is None or n <= 1:
        return True
    import jax
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized() and "--xla_force_host_platform_device_count" not in \
            os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", n)
    return jax.default_backend() != "cpu" or len(jax.devices()) >= n


def run(args):
    from glm5_jax.bench import build

    options = check(args)
    recipe = build.load_recipe(args.config, args.overrides)  # every recipe error here, before JAX starts
    index = build.stage_index(recipe, args.stage)
    if not devices_ready(build.devices_needed(recipe, index)):
        from glm5_jax.plan.devices import reexec_with_devices

        code = reexec_with_devices(build.devices_needed(recipe, index), args.argv)
        if code:
            sys.exit(code)
        return
    work = tempfile.mkdtemp(prefix="glm5-bench-", dir=args.work_dir)
    try:
        result = measure(args, options, recipe, index, work)
    finally:
        if args.keep:
            print(f"glm5 bench: kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    from glm5_jax.bench import report

    report.print_table(result)
    if args.json is not None:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")


def _out(message: str):
    print(f"glm5 bench: {message}", flush=True)


def measure(args, options: dict, recipe, index: int, work: str) -> dict:
    """Run the selected parts on stage `index` of `recipe` in the directory `work`: the result document."""
    from glm5_jax.bench import build, report
    from glm5_jax.accounting.analytic import work_of

    parts = options["parts"]
    bench = build.build(recipe, index)
    spec = bench.stage.step
    result = {"bench": {"config": args.config, "stage": bench.stage.name, "overrides": list(args.overrides),
                        "parts": parts, "steps": args.steps, "warmup": args.warmup, "seq_len": spec.seq_len,
                        "rows_per_microbatch": spec.rows, "accumulate": spec.accumulate,
                        "mesh": dict(bench.run.par.mesh.shape), "work_dir": work,
                        "expert_matmul": work_of(spec.model_cfg, bench.run.par).expert_matmul},
              "machine": report.machine()}
    _out(bench.stage.describe())
    feed = build.open_feed(bench, _out)
    if "data" in parts:
        from glm5_jax.bench import data

        result["data"] = data.measure(bench, feed, args.data_batches, _out)
    if parts == ["data"]:
        return result
    _out("initialising the model and optimizer state (run_state.restore_or_init)")
    state, it, ckpt = build.open_state(bench, os.path.join(work, "run"), feed, _out)
    try:
        _state_parts(args, options, bench, state, it, work, result)
    finally:
        it.close()
        ckpt.close()
    return result


def _state_parts(args, options: dict, bench, state, it, work: str, result: dict):
    """The parts that need the step's state: step, checkpoint, convert (in that order, into `result`)."""
    from glm5_jax.bench import conversion, storage
    from glm5_jax.bench import step as step_part

    parts, batches = options["parts"], None
    if "step" in parts:
        result["step"], batches = step_part.run_step_part(bench, state, it, args.steps, args.warmup, _out)
    checkpoint = None
    if "checkpoint" in parts:
        median = result["step"]["step"]["median_s"] if "step" in result else None
        result["disk"], result["checkpoint"], checkpoint = storage.measure(
            bench, state, it, work, options["disk_bytes"], batches[-1] if batches else None, median, _out)
    if "convert" in parts:
        if checkpoint is None:
            checkpoint = os.path.join(work, "checkpoints-sync")
            _out("saving the checkpoint to convert")
            storage.save_once(bench, state, it, checkpoint)
        result["convert"] = conversion.measure(checkpoint, work, options["directions"], _out)


def register(sub):
    b = sub.add_parser("bench", help="benchmark a recipe stage's train step, data pipeline, checkpoints and "
                       "conversion (docs/bench.md)")
    b.add_argument("--config", required=True, help="recipe preset name (quickstart, glm5, ...) or YAML file; or a "
                   "model preset (tiny), benchmarked on the default data's first stage")
    b.add_argument("--stage", default=None, help="the recipe stage to benchmark (default: the first)")
    b.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    b.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, comma-separated: {', '.join(PARTS)} "
                   "(default all)")
    b.add_argument("--json", default=None, metavar="OUT", help="also write every figure to this JSON file")
    b.add_argument("--work-dir", default=None, help="folder for the checkpoints, disk test and conversions (a "
                   "fresh subfolder, removed at the end; default the system's temporary folder)")
    b.add_argument("--keep", action="store_true", help="keep the work folder")
    b.add_argument("--disk-bytes", default="1GiB", help="bytes written for the disk's own speed (default 1GiB)")
    b.add_argument("--data-batches", type=int, default=20, help="batches timed for the data part (default 20)")
    b.add_argument("--convert-directions", default=",".join(DIRECTIONS),
                   help="conversions the convert part times (default orbax-to-hf,hf-to-orbax)")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, as for glm5 train (e.g. stages.0.steps=5 model_overrides.hidden_size=256)")
    b.set_defaults(run=run)
