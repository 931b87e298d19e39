"""Decode speed of a checkpoint (default: a randomly initialised tiny preset model) on this machine.

Prints tokens per second of plain greedy decoding and of MTP speculative decoding for a few batch sizes,
with the mean acceptance length. Compilation happens before the timed loop (see glm5_jax/generate/runner.py).

    .venv/bin/python benchmarks/generate_speed.py [--checkpoint DIR] [--prompt-len 64] [--new 64]
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
from flax import nnx

from glm5_jax import config
from glm5_jax.checkpoint.store import load_model
from glm5_jax.generate.runner import Generator
from glm5_jax.model import GLM5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="checkpoint to load (default: random tiny model)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    if args.checkpoint:
        model, cfg = load_model(args.checkpoint)
    else:
        cfg = config.load("tiny", [])
        model = GLM5(cfg, rngs=nnx.Rngs(0))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; prompt {args.prompt_len} tokens, "
          f"{args.new} new; index_topk {cfg.index_topk} (decode is sparse)")
    for spec in (False, True):
        gen = Generator(model, speculative_mtp=spec)
        for batch in map(int, args.batches.split(",")):
            rng = np.random.default_rng(batch)  # the same prompts with and without speculation
            prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).astype(np.int32) for _ in range(batch)]
            r = gen.generate(prompts, args.new)
            extra = f", mean acceptance length {r.accepted:.2f}" if spec else ""
            print(f"{'mtp speculative' if spec else 'plain'} batch {batch}: {r.generated} tokens in "
                  f"{r.decode_seconds:.2f} s = {r.tokens_per_second:.0f} tokens/s{extra}")


if __name__ == "__main__":
    main()
