"""`glm5 generate`: its options; read and check the prompts (before the model loads), generate, print and save."""

from __future__ import annotations

import os
import sys

from glm5_jax.errors import ConfigError, InputError
from glm5_jax.values import key_values


def load_tokenizer(name: str):
    """`bytes` (the built-in byte tokenizer) or a tokenizer.json path."""
    from glm5_jax.data.tokenizer import ByteTokenizer, HFTokenizer

    if name == "bytes":
        return ByteTokenizer()
    path = os.path.expanduser(name)
    if not (os.path.isfile(path) and path.endswith(".json")):
        raise InputError(f"--tokenizer {name}: unknown tokenizer; use 'bytes' or the path of a tokenizer.json")
    # eos_id only matters for packing training data; generation stops at the model config's EOS ids.
    return HFTokenizer(path, eos_id=0)


def read_prompts(args, cfg) -> tuple[list, object]:
    """The prompts as 1-D int32 arrays and the tokenizer (None with --prompt-ids), all checked against the
    model config `cfg`."""
    tokenizer = None
    if args.prompt_ids:
        from glm5_jax.token_ids import read_ids

        prompts = [row[:_unpadded(row)] for row in read_ids(args.prompt_ids, "--prompt-ids", one_row=True)]
        what = f"--prompt-ids {args.prompt_ids}"
    else:
        if not args.tokenizer:
            raise InputError("--prompt: needs --tokenizer (bytes or a tokenizer.json)")
        tokenizer = load_tokenizer(args.tokenizer)
        prompts = [tokenizer.encode(text) for text in args.prompt]
        what = "--prompt"
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"{what}: prompt {i} is empty")
        if len(p) >= cfg.max_position_embeddings:
            raise InputError(f"{what}: prompt {i} has {len(p)} tokens; the model allows at most "
                              f"{cfg.max_position_embeddings - 1} before the first generated one "
                              f"(max_position_embeddings {cfg.max_position_embeddings})")
        if p.min() < 0 or p.max() >= cfg.vocab_size:
            raise InputError(f"{what}: prompt {i} has ids outside the vocabulary [0, {cfg.vocab_size}): "
                              f"[{p.min()}, {p.max()}]")
    return prompts, tokenizer


def _unpadded(row) -> int:
    """Length of a row without its trailing -1 padding."""
    import numpy as np

    real = np.flatnonzero(row != -1)
    return int(real[-1]) + 1 if len(real) else 0


def check_text(prompts) -> None:
    """Each --prompt must be UTF-8 text: bytes the locale could not decode arrive as lone surrogates."""
    for i, text in enumerate(prompts or ()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"--prompt: prompt {i} is not valid UTF-8 text (at character {e.start})") from None


def run(args):
    from glm5_jax.checkpoint.store import CheckpointReader

    check_text(args.prompt)
    cfg = CheckpointReader(args.checkpoint, args.step).config
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be a positive integer; got {args.max_new_tokens}")
    from glm5_jax.generate.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).validate()
    if args.speculative == "mtp" and not cfg.has_mtp:
        raise ConfigError(f"--speculative mtp: {args.checkpoint} has no MTP layer (num_nextn_predict_layers 0)")
    prompts, tokenizer = read_prompts(args, cfg)
    longest = max(len(p) for p in prompts)
    max_length = args.max_length or min(longest + args.max_new_tokens, cfg.max_position_embeddings)
    from glm5_jax.generate.runner import check_max_length

    check_max_length(cfg, max_length)
    if max_length <= longest:
        raise ConfigError(f"--max-length: {max_length} leaves no room after the longest prompt ({longest} tokens)")
    if args.output:
        from glm5_jax.checkpoint.outputs import check_output

        check_output(args.output, "--output")
        if os.path.exists(args.output) and not args.overwrite:
            raise ConfigError(f"--output {args.output}: exists; pass --overwrite to replace it")

    from glm5_jax.checkpoint.store import load_model
    from glm5_jax.generate.runner import Generator

    par = None
    if args.layout or args.layout_override:
        from glm5_jax.sharding.context import Parallelism
        from glm5_jax.sharding.layout import load_layout

        try:
            par = Parallelism.create(load_layout(args.layout, args.layout_override))
        except (ValueError, AssertionError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"--layout: {e}") from None
        from glm5_jax.model.layout_check import check_layout

        check_layout(cfg, par, len(prompts), None, "--layout")
    model, _ = load_model(args.checkpoint, args.step, overrides=args.override)
    gen = Generator(model, sampling, speculative_mtp=args.speculative == "mtp", par=par)
    print(f"compiling the prefill and decode steps for {len(prompts)} rows x {max_length} slots, then generating "
          "(the compile takes 10-60 s)", file=sys.stderr, flush=True)
    result = gen.generate(prompts, args.max_new_tokens, max_length)
    for i, s in enumerate(result.sequences):
        shown = tokenizer.decode(s) if tokenizer is not None else " ".join(map(str, s.tolist()))
        print(f"[{i}] {shown}")
    print(f"generated {result.generated} tokens in {result.decode_seconds:.2f} s of decoding: "
          f"{result.tokens_per_second:.1f} tokens/s ({len(prompts)} rows, {result.steps} steps)")
    if result.accepted is not None:
        print(f"mean acceptance length: {result.accepted:.2f} tokens per step (mtp_depths {cfg.mtp_depths})")
    if args.output:
        from glm5_jax.checkpoint.outputs import write_npy

        out = result.padded(-1)
        write_npy(args.output, out)
        print(f"wrote {args.output}: ids {out.shape} int32 (prompt + generated; shorter rows padded with -1)")


def register(sub):
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
    key_values(g, "--layout-override", "layout override, e.g. mesh.tensor=2 (repeatable)")
    key_values(g, "--override", "model config override, e.g. dtype=bfloat16 (repeatable)")
    g.add_argument("--output", default=None, help=".npy file for the sequences, int32 [batch, length]")
    g.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    g.set_defaults(run=run)
