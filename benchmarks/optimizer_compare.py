"""Train the tiny GLM-5 with Muon-Split, plain Muon and AdamW on the same token stream; print a loss table.

The data is a fixed first-order Markov chain over the vocabulary (each token has a few likely successors),
so the best achievable loss is the chain's conditional entropy, printed as the floor. Same initial
weights, same batches, same schedule for every optimizer; only the optimizer differs.

    .venv/bin/python benchmarks/optimizer_compare.py [--steps 150] [--lr 3e-3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glm5_jax import config
from glm5_jax.model import GLM5
from glm5_jax.optim import OptimizerConfig, make_optimizer


def markov_chain(vocab: int, successors: int, seed: int):
    """Transition matrix with `successors` random next tokens per token (Dirichlet weights)."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((vocab, vocab))
    for t in range(vocab):
        probs[t, rng.choice(vocab, successors, replace=False)] = rng.dirichlet(np.ones(successors))
    entropy = -np.sum(probs * np.log(np.where(probs > 0, probs, 1)), axis=1).mean()  # uniform start ~ stationary
    return probs, entropy


def sample(probs, batch: int, length: int, rng):
    cumulative = probs.cumsum(axis=1)
    ids = np.empty((batch, length), np.int32)
    ids[:, 0] = rng.integers(0, len(probs), batch)
    for i in range(1, length):
        u = rng.random(batch)[:, None]
        ids[:, i] = np.minimum((cumulative[ids[:, i - 1]] < u).sum(axis=1), len(probs) - 1)
    return ids


def train(name, opt: OptimizerConfig, cfg, batches, eval_ids, eval_every):
    graphdef, params, buffers = nnx.split(GLM5(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = make_optimizer(opt, cfg, params)
    state = tx.init(params)

    def loss_fn(params, ids):
        logits = nnx.merge(graphdef, params, buffers)(ids[:, :-1], mtp_depths=0).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(params, state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(loss_fn)
    evals, losses, start = {}, [], time.time()
    for i, ids in enumerate(batches):
        if i % eval_every == 0:
            evals[i] = float(evaluate(params, eval_ids))
        params, state, loss = step(params, state, ids)
        losses.append(float(loss))
    evals[len(batches)] = float(evaluate(params, eval_ids))
    print(f"  {name}: {time.time() - start:.0f}s", flush=True)
    return evals, losses


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=65, help="tokens per row (64 predicted)")
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()

    cfg = config.load("tiny")
    probs, floor = markov_chain(cfg.vocab_size, successors=4, seed=0)
    rng = np.random.default_rng(1)
    batches = [jnp.asarray(sample(probs, args.batch, args.seq, rng)) for _ in range(args.steps)]
    eval_ids = jnp.asarray(sample(probs, 32, args.seq, np.random.default_rng(2)))
    common = {"learning_rate": args.lr, "schedule": "cosine", "warmup_steps": args.warmup,
              "total_steps": args.steps, "end_learning_rate": args.lr / 10}
    runs = {
        "Muon-Split": OptimizerConfig(**common),
        "Muon (plain)": OptimizerConfig(**common, split_heads=False),
        "AdamW": OptimizerConfig(**common, matrix_optimizer="adamw"),
    }
    print(f"tiny GLM-5, {args.steps} steps x {args.batch} x {args.seq - 1} tokens, cosine lr {args.lr} "
          f"(warm-up {args.warmup}), Markov-chain floor {floor:.3f} nats")
    eval_every = max(args.steps // 3, 1)
    results = {name: train(name, opt, cfg, batches, eval_ids, eval_every) for name, opt in runs.items()}
    points = sorted(next(iter(results.values()))[0])
    header = " | ".join(f"eval @ {s}" for s in points)
    print(f"\n| optimizer | {header} | train (last 10 steps) |")
    print("|---|" + "---|" * (len(points) + 1))
    for name, (evals, losses) in results.items():
        cells = " | ".join(f"{evals[s]:.3f}" for s in points)
        print(f"| {name} | {cells} | {np.mean(losses[-10:]):.3f} |")


if __name__ == "__main__":
    main()
