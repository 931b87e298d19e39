"""Per-token log-probabilities and entropies of a policy: the one function the rollout engine scores its
samples with and the RL objectives train through, so that both see the same numbers (docs/post-training.md,
"Log-prob parity").

The head runs one block of positions at a time (`cfg.logits_block` logits rows, rematerialised), so no
[length, vocab] array exists, as in the pre-training loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax.model.blocks import map_blocks


def token_logprobs(model, batch: dict, temperature: float = 1.0):
    """(log pi(targets) [B, L] float32, entropy of pi [B, L] float32) of `model` on `batch` (`input_ids`,
    `positions`, `segment_ids`, `targets` [B, L] int32), with pi = softmax(logits / temperature); 0 where a
    target is < 0 (not scored). Attention runs in the model's plain mode (`dsa_mode` "sparse": the indexer
    selects keys and learns nothing); no MTP."""
    targets = batch["targets"]
    out = model(batch["input_ids"], batch["positions"], batch["segment_ids"], mtp_depths=0, logits=False)

    def block(h, t):
        x = model.head(h) / temperature  # [B, block, V] float32
        logz = jax.nn.logsumexp(x, axis=-1)
        picked = jnp.take_along_axis(x, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
        entropy = logz - jnp.sum(jax.nn.softmax(x, axis=-1) * x, axis=-1)
        return picked - logz, entropy

    logp, entropy = map_blocks(block, max(1, model.cfg.logits_block), out.hidden, targets, remat=True)
    scored = targets >= 0
    return jnp.where(scored, logp, 0.0), jnp.where(scored, entropy, 0.0)


def state_logprobs(params, buffers, graphdef, batch: dict, temperature: float = 1.0):
    """`token_logprobs` of the model held as nnx state (params, buffers) with `graphdef`."""
    return token_logprobs(nnx.merge(graphdef, params, buffers), batch, temperature)
