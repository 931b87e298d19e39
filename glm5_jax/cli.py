"""The `glm5` command line: one entry point, a subcommand per job.

Errors a user can fix (bad config, bad input files, an existing output) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from glm5_jax.errors import ConfigError, Glm5Error, InputError
from glm5_jax.values import apply_overrides


def _convert_hf_to_orbax(args):
    from glm5_jax.convert.hf import hf_to_orbax

    cfg = hf_to_orbax(args.hf_dir, args.out, overrides=args.override, overwrite=args.overwrite,
                      show_progress=not args.quiet)
    print(f"wrote {args.out} (step 0): {cfg.num_hidden_layers} layers, "
          f"{'with' if cfg.has_mtp else 'without'} MTP, params {cfg.param_dtype}")


def _convert_orbax_to_hf(args):
    from glm5_jax.convert.hf import orbax_to_hf

    orbax_to_hf(args.checkpoint, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                quantize=args.quantize, overwrite=args.overwrite, show_progress=not args.quiet)
    print(f"wrote {args.out}")


def _init(args):
    from flax import nnx

    from glm5_jax import config
    from glm5_jax.checkpoint import atomic_output_dir, save_model
    from glm5_jax.model import GLM5

    cfg = config.load(args.config, args.override)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        save_model(GLM5(cfg, rngs=nnx.Rngs(args.seed)), cfg, tmp)
    print(f"wrote {args.out} (step 0): randomly initialised {args.config} model, seed {args.seed}")


def _load_ids(path: str, what: str, shape=None):
    import numpy as np

    if os.path.isdir(path):
        raise InputError(f"{what} {path}: is a directory, not a .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    except (ValueError, EOFError) as e:
        # np.load reads a non-.npy file as a pickle, then refuses it: "pickled (object) data", "Failed to interpret".
        why = "" if "pickle" in str(e) else f" ({str(e).splitlines()[0][:120]})"
        raise InputError(f"{what} {path}: not a .npy file{why}; save the ids with numpy.save") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{what} {path}: need a 2-D integer array [batch, seq]; got {array.dtype} {array.shape}")
    if array.size == 0:
        raise InputError(f"{what} {path}: is empty (shape {list(array.shape)}); need at least one token per row")
    if shape is not None and array.shape != shape:
        raise InputError(f"{what} {path}: shape {array.shape} differs from --input-ids {shape}")
    return array.astype(np.int32)


def _forward(args):
    import jax
    import numpy as np
    from flax import nnx

    from glm5_jax.checkpoint import CheckpointReader, load_model
    from glm5_jax.checkpoint.store import in_progress

    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise InputError(f"--output {args.output}: folder {out_dir} does not exist")
    if os.path.isdir(args.output):
        raise InputError(f"--output {args.output}: is a directory; name a .npy file")
    ids = _load_ids(args.input_ids, "--input-ids")
    positions = _load_ids(args.positions, "--positions", ids.shape) if args.positions else None
    segments = _load_ids(args.segment_ids, "--segment-ids", ids.shape) if args.segment_ids else None
    vocab = CheckpointReader(args.checkpoint, args.step).config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"--input-ids {args.input_ids}: ids must lie in [0, {vocab}); got [{ids.min()}, {ids.max()}]")
    model, cfg = load_model(args.checkpoint, args.step, overrides=args.override)
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits_of(state, ids, positions, segments):
        return nnx.merge(graphdef, state)(ids, positions, segments, mtp_depths=0).logits

    logits = np.asarray(logits_of(state, ids, positions, segments), dtype=np.float32)
    tmp = f"{args.output}.tmp-{os.getpid()}.npy"
    with in_progress(tmp):
        try:
            np.save(tmp, logits)
            os.replace(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    print(f"wrote {args.output}: logits {logits.shape} float32")


def _optimizer(args):
    from glm5_jax import config
    from glm5_jax.model import layer_range_name
    from glm5_jax.optim import from_dict, print_table
    from glm5_jax.train.setup import routing_table

    cfg = config.load(args.config, args.override)
    opt = from_dict(apply_overrides({}, args.opt))
    print_table(routing_table(cfg, opt), lambda name: layer_range_name(name, cfg))


def _data_inspect(args):
    from glm5_jax.data.inspect import inspect

    for flag, value, minimum in (("--rows", args.rows, 0), ("--batches", args.batches, 1),
                                 ("--chars", args.chars, 1)):
        if value < minimum:
            raise InputError(f"{flag}: must be an integer >= {minimum}; got {value}")
    inspect(args.config, rows=args.rows, stage=args.stage, batches=args.batches, chars=args.chars,
            overrides=args.override)


# ----- glm5 train / glm5 plot -----


def _train(args):
    from glm5_jax.train import recipe as recipe_lib

    overrides = list(args.overrides)
    if args.stage:
        overrides.append(f"start_stage={args.stage}")
    recipe = recipe_lib.load(args.config, overrides)  # every config error surfaces here, before JAX starts
    from glm5_jax.train.trainer import train

    summary = train(recipe)  # TrainingStopped (exit 3) reaches _run like every Glm5Error
    if summary["stopped"] == "sigterm-compiling":  # everything is saved and closed; the abandoned compile thread
        sys.stdout.flush()                          # would abort the interpreter's teardown: leave without one
        sys.stderr.flush()
        os._exit(0)


def _eval(args):
    from glm5_jax.train.evaluate import evaluate_checkpoint

    if args.batches < 1:
        raise ConfigError(f"--batches: must be a positive integer; got {args.batches}")
    r = evaluate_checkpoint(args.checkpoint, args.data, args.stage, args.batches, args.step, args.layout,
                            args.data_override, args.holdout)
    print(f"{r['checkpoint']} step {r['step']} on {args.data} stage {r['stage']} ({r['batches']} x {r['rows']} rows "
          f"x {r['seq_len']} tokens, {r['tokens']:,} scored): loss {r['loss']:.4f}, LM loss {r['lm']:.4f}, "
          f"perplexity {r['ppl']:.2f}")


def _plot(args):
    from glm5_jax.train.plot import plot

    out = plot(args.run_dir, args.out)
    print(f"wrote {out}")


def _add_train_parsers(sub):
    tr = sub.add_parser("train", help="train a model with a recipe (configs/recipes), resuming from its run dir")
    tr.add_argument("--config", required=True, help="recipe preset name (quickstart, glm5) or YAML file")
    tr.add_argument("--stage", default=None, help="start at this stage (same as start_stage=NAME)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="recipe overrides, e.g. max_steps=40 stages.0.steps=100 optimizer.weight_decay=0.1")
    tr.set_defaults(run=_train)
    ev = sub.add_parser("eval", help="loss and perplexity of a checkpoint on a data config's stage")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (a run's checkpoints/ or a converted "
                    "HF model)")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ev.add_argument("--data", required=True, help="data preset name or YAML file")
    ev.add_argument("--stage", default=None, help="data stage (default: the first): its seq_len and rows per step")
    ev.add_argument("--batches", type=int, default=8, help="batches (steps' worth of rows) to evaluate (default 8)")
    ev.add_argument("--layout", default=None, help="layout preset or YAML file (default: all devices on data)")
    ev.add_argument("--holdout", type=float, default=0.0,
                    help="evaluate only the documents a run with eval.holdout=F held out (default 0: all)")
    _key_values(ev, "--data-override", "data config override, e.g. stages.0.seq_len=256 (repeatable)")
    ev.set_defaults(run=_eval)
    pl = sub.add_parser("plot", help="draw a run's loss and throughput curves (RUN_DIR/metrics.jsonl) to a PNG")
    pl.add_argument("run_dir", help="the run directory (recipe run_dir)")
    pl.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    pl.set_defaults(run=_plot)


def _generate(args):
    from glm5_jax.generate.command import run

    run(args)


def _add_generate_parser(sub):
    g = sub.add_parser("generate", help="generate text or ids from a checkpoint (KV-latent cache, sparse decode)")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--step", type=int, default=None, help="step to load (default: latest committed)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable: one row each); needs --tokenizer")
    src.add_argument("--prompt-ids", help=".npy int array [batch, length], rows right-padded with -1")
    g.add_argument("--tokenizer", help="'bytes' (built-in byte tokenizer) or a tokenizer.json path")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per row (default 64)")
    g.add_argument("--max-length", type=int, default=None,
                   help="cache slots per row (default longest prompt + max-new-tokens)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--speculative", choices=("mtp",), default=None, help="MTP speculative decoding")
    g.add_argument("--layout", default=None, help="layout preset (configs/layouts/NAME.yaml) or YAML file")
    _key_values(g, "--layout-override", "layout override, e.g. mesh.tensor=2 (repeatable)")
    _key_values(g, "--override", "model config override, e.g. dtype=bfloat16 (repeatable)")
    g.add_argument("--output", default=None, help=".npy file for the sequences, int32 [batch, length]")
    g.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    g.set_defaults(run=_generate)



def _key_values(parser, flag: str, help: str):
    """A repeatable `--flag KEY=VALUE` option, collected into a list."""
    parser.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm5", description="GLM-5 training stack in JAX/Flax.")
    p.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = p.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert between HF safetensors and Orbax checkpoints")
    csub = convert.add_subparsers(dest="direction", required=True)
    h2o = csub.add_parser("hf-to-orbax", help="transformers GLM-5 directory -> Orbax checkpoint (step 0)")
    h2o.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    h2o.add_argument("--out", required=True, help="checkpoint directory to create")
    _key_values(h2o, "--override", "set a config field config.json lacks, e.g. param_dtype=bfloat16 (repeatable)")
    h2o.set_defaults(run=_convert_hf_to_orbax)
    o2h = csub.add_parser("orbax-to-hf", help="Orbax checkpoint -> transformers GLM-5 directory")
    o2h.add_argument("--checkpoint", required=True, help="checkpoint directory (Orbax CheckpointManager root)")
    o2h.add_argument("--step", type=int, default=None, help="step to export (default: latest committed)")
    o2h.add_argument("--out", required=True, help="directory to create")
    o2h.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="tensor dtype in the safetensors files (router bias stays float32)")
    o2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    o2h.add_argument("--quantize", choices=("int4",), default=None,
                     help="routed experts as compressed-tensors INT4 (pack-quantized); needs a qat=int4 checkpoint")
    o2h.set_defaults(run=_convert_orbax_to_hf)
    for c in (h2o, o2h):
        c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    init = sub.add_parser("init", help="write a randomly initialised model as a checkpoint (step 0)")
    init.add_argument("--config", required=True, help="model preset name (e.g. tiny), YAML file or HF config.json")
    init.add_argument("--out", required=True, help="checkpoint directory to create")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    _key_values(init, "--override", "model config override (repeatable)")
    init.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    init.set_defaults(run=_init)

    fwd = sub.add_parser("forward", help="main-head logits of a checkpoint for a batch of token ids")
    fwd.add_argument("--checkpoint", required=True)
    fwd.add_argument("--step", type=int, default=None, help="step to load (default: latest committed)")
    fwd.add_argument("--input-ids", required=True, help=".npy int array [batch, seq]")
    fwd.add_argument("--positions", help=".npy int array [batch, seq] of RoPE positions (default 0..seq-1)")
    fwd.add_argument("--segment-ids", help=".npy int array [batch, seq] of document ids of packed rows")
    fwd.add_argument("--output", required=True, help=".npy file for float32 logits [batch, seq, vocab]")
    _key_values(fwd, "--override", "model config override, e.g. dtype=bfloat16 (repeatable)")
    fwd.set_defaults(run=_forward)

    optim = sub.add_parser("optimizer", help="print which optimizer trains each parameter (Muon-Split / AdamW)")
    optim.add_argument("--config", required=True, help="model preset name, YAML file or HF config.json")
    _key_values(optim, "--override", "model config override (repeatable)")
    _key_values(optim, "--opt", "optimizer config setting, e.g. split_o_proj=true (repeatable)")
    optim.set_defaults(run=_optimizer)

    data = sub.add_parser("data", help="data pipelines")
    dsub = data.add_subparsers(dest="data_command", required=True)
    insp = dsub.add_parser("inspect", help="stage table, decoded packed rows, packing efficiency and throughput")
    insp.add_argument("--config", default="default", help="data preset name (default, glm5) or YAML file")
    insp.add_argument("--rows", type=int, default=4, help="packed rows to show")
    insp.add_argument("--stage", default=None, help="stage to show (default: the first)")
    insp.add_argument("--batches", type=int, default=20, help="batches to time for the throughput figure")
    insp.add_argument("--chars", type=int, default=400, help="characters shown per row")
    _key_values(insp, "--override", "data config override, e.g. stages.0.seq_len=256 (repeatable)")
    insp.set_defaults(run=_data_inspect)
    from glm5_jax.plan_command import add_parser as add_plan_parser

    add_plan_parser(sub, _key_values)
    from glm5_jax.bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)
    _add_train_parsers(sub)
    _add_generate_parser(sub)
    from glm5_jax.launch_local import add_parser as add_launch_parser

    add_launch_parser(sub)
    return p


_GRACE_S = 3.0  # a stopped command that has not unwound by then (blocked in C, say) is ended outright
_stop_signal: list = [None]


def _exit_stopped(signum: int):
    """Remove temporary outputs, end worker processes, exit 128 + signal number (no interpreter teardown,
    which can crash while XLA threads still run)."""
    store = sys.modules.get("glm5_jax.checkpoint.store")
    remove = getattr(store, "remove_in_progress", None)  # (None while the module is still being imported:
    if remove is not None:                               # then nothing can have been registered yet)
        remove()
    import multiprocessing

    for child in multiprocessing.active_children():  # Grain workers
        child.terminate()
    sys.stdout.flush()
    print(f"glm5: stopped by {signal.Signals(signum).name}; nothing written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _stop(signum, frame):
    """SIGTERM, like Ctrl-C, unwinds the command (its atomic writers remove what they had started); a
    second signal, or a command still running after _GRACE_S, ends it at once."""
    if _stop_signal[0] is not None:
        _exit_stopped(signum)
    _stop_signal[0] = signum
    # The process now ends within _GRACE_S with one line. Until then what else fails is a consequence of the
    # stop, not the user's error: the interrupt landing where Python drops exceptions (a gc callback), or
    # background threads (Orbax's event loop, TensorStore callbacks) posting to a loop that has closed.
    sys.unraisablehook = lambda unraisable: None
    sys.excepthook = lambda *exc_info: None
    threading.excepthook = lambda hook_args: None
    timer = threading.Timer(_GRACE_S, _exit_stopped, (signum,))
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def _run(args) -> int:
    try:
        args.run(args)
    except Glm5Error as e:  # the one family of errors a user can fix (glm5_jax/errors.py)
        print(f"glm5: {e.kind}: {e}", file=sys.stderr)
        return e.exit_status
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (`glm5 plan` may re-execute itself with them)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        logging.getLogger("absl").setLevel(logging.ERROR)
    # `glm5 train` stops at a step boundary and checkpoints (its own handlers); every other command stops at
    # once, exit status 128 + signal number, and leaves no partial output.
    if args.command == "train" or threading.current_thread() is not threading.main_thread():
        return _run(args)
    _stop_signal[0] = None
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    except BaseException:  # the interrupt, or whatever it set off while the command unwound
        if _stop_signal[0] is None:
            raise
        _exit_stopped(_stop_signal[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
