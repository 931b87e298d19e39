"""`python -m tests.nonfinite_child STEPS glm5-args...`: `glm5` whose loss is NaN at the given global steps.

A test fixture, outside the product: it marks one target of those steps' batches with a value the data never
holds (targets < 0 are not scored, so the mark changes nothing else) and wraps the loss so a marked batch's
loss is NaN. The train step traces the wrapped loss like the real one.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp

from glm5_jax import cli
from glm5_jax.data import loader
from glm5_jax.train import losses

MARK = -7


def main():
    steps = {int(s) for s in sys.argv[1].split(",") if s}
    next_batch, total_loss = loader.PipelineIterator.__next__, losses.total_loss

    def marked(self):
        step = self.step + 1  # the 1-based global step this batch trains
        batch = next_batch(self)
        if step in steps:
            batch = {**batch, "targets": batch["targets"].copy()}
            batch["targets"][0, 0] = MARK
        return batch

    def poisoned(*args, **kwargs):
        loss, aux = total_loss(*args, **kwargs)
        return jnp.where(jnp.any(args[3]["targets"] == MARK), jnp.nan, loss), aux

    loader.PipelineIterator.__next__ = marked
    losses.total_loss = poisoned
    sys.exit(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
