"""`glm5 train`, `glm5 eval`, `glm5 plot` and `glm5 optimizer`: their options, checks and runs.

Nothing else in `glm5_jax.train` imports this module (training never imports a command). `glm5 optimizer`
lives here because it prints the trainer's own routing table (`setup.routing_table`) of a model: the
optimizer package may not import the model, the train package may.
"""

from __future__ import annotations

import os
import sys

from glm5_jax.errors import ConfigError
from glm5_jax.values import key_values


def run_train(args):
    from glm5_jax.train import recipe as recipe_lib

    overrides = list(args.overrides)
    if args.stage:
        overrides.append(f"start_stage={args.stage}")
    recipe = recipe_lib.load(args.config, overrides)  # every config error surfaces here, before JAX starts
    from glm5_jax.train.trainer import train

    summary = train(recipe)  # TrainingStopped (exit 3) reaches the command line like every Glm5Error
    if summary["stopped"] == "sigterm-compiling":  # everything is saved and closed; the abandoned compile thread
        sys.stdout.flush()                          # would abort the interpreter's teardown: leave without one
        sys.stderr.flush()
        os._exit(0)


def run_eval(args):
    from glm5_jax.train.evaluate import evaluate_checkpoint

    if args.batches < 1:
        raise ConfigError(f"--batches: must be a positive integer; got {args.batches}")
    r = evaluate_checkpoint(args.checkpoint, args.data, args.stage, args.batches, args.step, args.layout,
                            args.data_override, args.holdout, args.objective)
    print(f"{r['checkpoint']} step {r['step']} on {args.data} stage {r['stage']} ({r['batches']} x {r['rows']} rows "
          f"x {r['seq_len']} tokens, {r['tokens']:,} scored): loss {r['loss']:.4f}, LM loss {r['lm']:.4f}, "
          f"perplexity {r['ppl']:.2f}")


def run_plot(args):
    from glm5_jax.train.plot import plot

    out = plot(args.run_dir, args.out)
    print(f"wrote {out}")


def run_optimizer(args):
    from glm5_jax import config
    from glm5_jax.model import layer_range_name
    from glm5_jax.optim import from_dict, print_table
    from glm5_jax.train.setup import routing_table
    from glm5_jax.values import apply_overrides

    cfg = config.load(args.config, args.override)
    opt = from_dict(apply_overrides({}, args.opt))
    print_table(routing_table(cfg, opt), lambda name: layer_range_name(name, cfg))


def register(sub):
    tr = sub.add_parser("train", help="train a model with a recipe (configs/recipes), resuming from its run dir")
    tr.add_argument("--config", required=True, help="recipe preset name (quickstart, glm5) or YAML file")
    tr.add_argument("--stage", default=None, help="start at this stage (same as start_stage=NAME)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="recipe overrides, e.g. max_steps=40 stages.0.steps=100 optimizer.weight_decay=0.1")
    tr.set_defaults(run=run_train)
    ev = sub.add_parser("eval", help="loss and perplexity of a checkpoint on a data config's stage")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory: a run's checkpoints/, or an HF model "
                    "converted with glm5 convert hf-to-orbax")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ev.add_argument("--data", required=True, help="data preset name or YAML file")
    ev.add_argument("--stage", default=None, help="data stage (default: the first): its seq_len and rows per step")
    ev.add_argument("--batches", type=int, default=8, help="batches (steps' worth of rows) to evaluate (default 8)")
    ev.add_argument("--layout", default=None, help="layout preset or YAML file (default: all devices on data)")
    ev.add_argument("--holdout", type=float, default=0.0,
                    help="evaluate only the documents a run with eval.holdout=F held out (default 0: all)")
    ev.add_argument("--objective", default="pretrain",
                    help="the objective whose loss is reported: pretrain or sft (on chat data: the LM loss of the "
                         "assistant's tokens either way; default pretrain)")
    key_values(ev, "--data-override", "data config override, e.g. stages.0.seq_len=256 (repeatable)")
    ev.set_defaults(run=run_eval)
    pl = sub.add_parser("plot", help="draw a run's loss and throughput curves (RUN_DIR/metrics.jsonl) to a PNG")
    pl.add_argument("run_dir", help="the run directory (recipe run_dir)")
    pl.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    pl.set_defaults(run=run_plot)
    optim = sub.add_parser("optimizer", help="print which optimizer trains each parameter (Muon-Split / AdamW)")
    optim.add_argument("--config", required=True, help="model preset name, YAML file or HF config.json")
    key_values(optim, "--override", "model config override (repeatable)")
    key_values(optim, "--opt", "optimizer config setting, e.g. split_o_proj=true (repeatable)")
    optim.set_defaults(run=run_optimizer)
