"""`glm5 plan`: its options and their checks (one line, exit 2, before JAX starts), then the plan package."""

from __future__ import annotations

import sys

from glm5_jax.errors import ConfigError
from glm5_jax.values import key_values

_ONE_STEP_FLAGS = (("--layout", "layout", None), ("--seq-len", "seq_len", None), ("--global-batch", "global_batch", None),
                   ("--accumulate", "accumulate", None), ("--override", "override", []),
                   ("--layout-override", "layout_override", []), ("--opt", "opt", []), ("--loss", "loss", []))


def run(args):
    from glm5_jax.plan import devices as targets
    from glm5_jax.plan import report, stages

    target = targets.parse_target(args.target)
    if (args.config is None) == (args.recipe is None):
        raise ConfigError("--config / --recipe: give one: --config MODEL plans one step, --recipe RECIPE its stages")
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices: must be a positive integer; got {args.devices}")
    if args.devices is not None and target.compile_only:
        raise ConfigError(f"--devices: the topology of --target {target.name} gives the devices")
    recipe = None
    if args.recipe is not None:
        from glm5_jax.train import recipe as recipe_lib

        for flag, dest, unset in _ONE_STEP_FLAGS:
            if getattr(args, dest) != unset:
                raise ConfigError(f"{flag}: with --recipe the recipe's stages set it; override the recipe with "
                                  "KEY=VALUE arguments (e.g. stages.0.accumulate=4)")
        recipe = recipe_lib.load(args.recipe, args.overrides)  # every recipe error before JAX starts
        stages.select(recipe, args.stage)
    elif args.stage is not None or args.overrides:
        raise ConfigError(f"{'--stage' if args.stage is not None else args.overrides[0]}: only with --recipe")
    if target.compile_only:
        devices = targets.compile_devices(target)
    else:
        n = args.devices or (8 if recipe is None else stages.devices_needed(recipe))
        if n is None:
            raise ConfigError("--devices: the recipe's layout takes its size from the device count (-1): give "
                              "--devices N or the recipe's `devices`")
        if not targets.cpu_devices_ready(n):  # JAX already started with fewer devices: a fresh process
            code = targets.reexec_with_devices(n, args.argv)
            if code:
                sys.exit(code)
            return
        import jax

        devices = jax.devices("cpu")[:n]
    limit = targets.device_memory(devices, target, args.device_memory)
    if recipe is None:
        from glm5_jax.plan.measure import run as plan_step

        result = plan_step(args.config, args.override, args.layout, args.layout_override, len(devices),
                           4096 if args.seq_len is None else args.seq_len, args.global_batch, limit, args.opt,
                           device_list=devices, accumulate=1 if args.accumulate is None else args.accumulate,
                           loss_overrides=args.loss, target=target)
        report.print_report(result)
        return
    rows = stages.plan_recipe(recipe, args.stage, devices, target, limit, on_row=report.print_stage_row)
    if len(rows) == 1 and rows[0].result is not None:
        report.print_report(rows[0].result)
    first = next((r.result for r in rows if r.result is not None), None)
    line = f"compiled by {report.compiler(first)}" if first is not None else f"target {target.name}"
    report.print_stages(rows, f"{line}; {len(devices)} devices.")


def register(sub):
    pl = sub.add_parser("plan", help="compile a train step (or every stage of a recipe) ahead of time for simulated "
                        "CPU devices, a TPU topology or GPUs: memory and FLOPs")
    what = pl.add_mutually_exclusive_group()
    what.add_argument("--config", default=None, help="model preset name, YAML file or HF config.json: plan one step")
    what.add_argument("--recipe", default=None, help="recipe preset name (glm5, quickstart) or YAML file: plan its "
                      "stages, each with the step that trains it")
    pl.add_argument("--stage", default=None, help="with --recipe: the stage to plan, or all (default all)")
    pl.add_argument("--target", default="cpu", help="cpu (simulated devices, XLA:CPU: an upper bound; default), or "
                    "a TPU slice compiled by libtpu: tpu:v5p-512, tpu:v6e-256, tpu:v5p:4x8x8, or GPUs compiled "
                    "by XLA's GPU compiler: gpu:h100-256, gpu:h200-128 (docs/plan.md)")
    pl.add_argument("--layout", default=None, help="layout preset (configs/layouts/NAME.yaml) or YAML file")
    pl.add_argument("--devices", type=int, default=None, help="simulated CPU devices (default 8; with --recipe the "
                    "recipe's layout's size)")
    pl.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096)")
    pl.add_argument("--global-batch", type=int, default=None,
                    help="sequences per step (default: one per batch shard and pipeline microbatch, x --accumulate)")
    pl.add_argument("--accumulate", type=int, default=None,
                    help="microbatches per step (gradient accumulation), as a recipe stage's `accumulate` (default 1)")
    pl.add_argument("--device-memory", default=None, help="memory of one device on --target cpu or gpu:..., e.g. "
                    "80GB, 96GiB (default 80GB; a GPU's nominal capacity; a TPU target's compiler knows its HBM)")
    key_values(pl, "--override", "model config override, e.g. num_hidden_layers=6 (repeatable)")
    key_values(pl, "--layout-override", "layout override, e.g. mesh.tensor=8 (repeatable)")
    key_values(pl, "--opt", "optimizer config setting (default: GLM-5's Muon-Split) (repeatable)")
    key_values(pl, "--loss", "loss setting, e.g. mtp_weight=0 (default: the GLM-5 losses) (repeatable)")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="with --recipe: recipe overrides, as for "
                    "glm5 train (e.g. stages.0.accumulate=4 model_overrides.num_hidden_layers=4)")
    pl.set_defaults(run=run)
