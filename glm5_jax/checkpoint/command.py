"""`glm5 init` (a randomly initialised model written as a checkpoint) and `glm5 forward` (a checkpoint's
logits for a batch of token ids): their options, checks and runs."""

from __future__ import annotations

from glm5_jax.errors import InputError
from glm5_jax.values import key_values


def run_init(args):
    from flax import nnx

    from glm5_jax import config
    from glm5_jax.checkpoint.outputs import atomic_output_dir
    from glm5_jax.checkpoint.store import abstract_leaves, save_model
    from glm5_jax.memory import check_fits
    from glm5_jax.model import GLM5

    cfg = config.load(args.config, args.override)
    check_fits("init: the model's parameters", abstract_leaves(cfg))
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        save_model(GLM5(cfg, rngs=nnx.Rngs(args.seed)), cfg, tmp)
    print(f"wrote {args.out} (step 0): randomly initialised {args.config} model, seed {args.seed}")


def run_forward(args):
    import jax
    import numpy as np
    from flax import nnx

    from glm5_jax.checkpoint.outputs import check_output, write_npy
    from glm5_jax.checkpoint.store import CheckpointReader, load_model
    from glm5_jax.token_ids import read_ids

    check_output(args.output, "--output")
    ids = read_ids(args.input_ids, "--input-ids")
    positions = read_ids(args.positions, "--positions", ids.shape, minimum=0) if args.positions else None
    segments = read_ids(args.segment_ids, "--segment-ids", ids.shape, minimum=0) if args.segment_ids else None
    vocab = CheckpointReader(args.checkpoint, args.step).config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"--input-ids {args.input_ids}: ids must lie in [0, {vocab}); got [{ids.min()}, {ids.max()}]")
    model, cfg = load_model(args.checkpoint, args.step, overrides=args.override)
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits_of(state, ids, positions, segments):
        return nnx.merge(graphdef, state)(ids, positions, segments, mtp_depths=0).logits

    logits = np.asarray(logits_of(state, ids, positions, segments), dtype=np.float32)
    write_npy(args.output, logits)
    print(f"wrote {args.output}: logits {logits.shape} float32")


def register(sub):
    init = sub.add_parser("init", help="write a randomly initialised model as a checkpoint (step 0)")
    init.add_argument("--config", required=True, help="model preset name (e.g. tiny), YAML file or HF config.json")
    init.add_argument("--out", required=True, help="checkpoint directory to create")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    key_values(init, "--override", "model config override (repeatable)")
    init.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    init.set_defaults(run=run_init)

    fwd = sub.add_parser("forward", help="main-head logits of a checkpoint for a batch of token ids")
    fwd.add_argument("--checkpoint", required=True)
    fwd.add_argument("--step", type=int, default=None, help="step to load (default: latest committed)")
    fwd.add_argument("--input-ids", required=True, help=".npy int array [batch, seq]")
    fwd.add_argument("--positions", help=".npy int array [batch, seq] of RoPE positions (default 0..seq-1)")
    fwd.add_argument("--segment-ids", help=".npy int array [batch, seq] of document ids of packed rows")
    fwd.add_argument("--output", required=True, help=".npy file for float32 logits [batch, seq, vocab]")
    key_values(fwd, "--override", "model config override, e.g. dtype=bfloat16 (repeatable)")
    fwd.set_defaults(run=run_forward)
