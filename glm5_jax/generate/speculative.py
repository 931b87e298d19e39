"""MTP speculative decoding: draft with the MTP layer depth after depth, verify with one main forward.

Drafting (at the newest committed position N - 1, token N known): depth k at position t reads token
t + k and depth k - 1's hidden state at t, exactly as in training, and attends over its own cache of
depth-k latents. Each step reruns every depth over the last `window` positions, so entries that were
computed from a drafted token are rewritten once that token is committed (window = 2 * depths + 1 covers
the largest jump of one step); the last position's logits at depth k give draft token N + k.

Verification runs the main model once over [token N, draft 1 .. draft D] at positions N .. N + D. Greedy
accepts the longest prefix of drafts equal to the main model's argmax, then adds the main model's own
next token; sampling accepts draft i with probability min(1, p(d_i) / q(d_i)) and at the first rejection
draws from normalise(max(p - q, 0)) (all accepted: from p at the last position), so the output follows
the main model's sampling distribution exactly. Either way a step commits accepted + 1 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm5_jax.generate import step as step_lib
from glm5_jax.generate.sampling import Sampling, log_probs, sample
from glm5_jax.model.mla import write_slots


def window(cfg) -> int:
    return 2 * cfg.mtp_depths + 1


def step(model, cache, hidden, seq, n, s: Sampling, key):
    """One speculative step from newest tokens seq[b, n[b]]: draft, then verify.

    -> (tokens [B, D + 1], accepted [B], cache, hidden, draft logits [B, D, V]) (see `verify`)."""
    k_draft, k_verify = jax.random.split(key)
    drafts, draft_logits, cache = draft(model, cache, hidden, seq, n, s, k_draft)
    ids = jnp.concatenate([jnp.take_along_axis(seq, n[:, None], axis=1), drafts], axis=1)
    q_logp = None if s.greedy else log_probs(draft_logits, s)
    return (*verify(model, cache, hidden, ids, n, q_logp, s, k_verify), draft_logits)


def draft(model, cache, hidden, seq, n, s: Sampling, key):
    """Draft tokens [B, depths] for positions n + 1 .. n + depths, the MTP logits they were drawn from
    [B, depths, V] (float32), and the cache with the MTP depths' window entries rewritten.

    hidden [B, T, D]: the main model's final-normed hidden state per position (valid below n);
    seq [B, T]: committed tokens (valid up to n)."""
    D, W = model.cfg.mtp_depths, window(model.cfg)
    B, T = seq.shape
    pos = n[:, None] - W + jnp.arange(W, dtype=jnp.int32)  # positions n - W .. n - 1; negative ones unused
    tok_pos = n[:, None] - W + jnp.arange(W + D + 1, dtype=jnp.int32)  # tokens n - W .. n + D
    ext = jnp.take_along_axis(seq, jnp.clip(tok_pos, 0, T - 1), axis=1)
    h0 = jnp.take_along_axis(hidden, jnp.clip(pos, 0, T - 1)[..., None], axis=1)
    keys = jax.random.split(key, D)

    def depth(carry, x):
        h_prev, ext, cache = carry
        d, k = x
        ids = jax.lax.dynamic_slice_in_dim(ext, d + 1, W, axis=1)  # token t + (d + 1) at position t
        h, logits, cache = step_lib.mtp_decode(model, cache, d, h_prev, ids, pos)
        last = logits[:, -1]
        token = sample(last, s, k)
        ext = jax.lax.dynamic_update_slice_in_dim(ext, token[:, None], W + d + 1, axis=1)
        return (h, ext, cache), (token, last)

    (_, _, cache), (tokens, logits) = jax.lax.scan(depth, (h0, ext, cache), (jnp.arange(D), keys))
    return tokens.T, jnp.swapaxes(logits, 0, 1), cache


def verify(model, cache, hidden, ids, n, q_logp, s: Sampling, key):
    """Main model over ids [B, D + 1] = [token n, drafts] at positions n .. n + D.

    -> (tokens [B, D + 1] for positions n + 1 ..: the first accepted + 1 are the step's output, accepted
    [B] int32, cache, hidden with these positions written)."""
    Q = ids.shape[1]
    drafts = ids[:, 1:]
    positions = n[:, None] + jnp.arange(Q, dtype=jnp.int32)
    logits, h, cache = step_lib.decode(model, cache, ids, positions)
    hidden = write_slots(hidden, positions, h.astype(hidden.dtype))
    if s.greedy:
        accepted, last = accept_greedy(logits, drafts)
    else:
        accepted, last = accept_sampled(log_probs(logits, s), q_logp, drafts, key)
    j = jnp.arange(Q)
    tokens = jnp.where(j < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), last[:, None])
    return tokens, accepted, cache, hidden


def accept_greedy(logits, drafts):
    """Longest prefix of drafts [B, D] equal to the argmax of the main logits [B, D + 1, V] at the position
    before each, and the main model's argmax after it. -> (accepted [B], next token [B])."""
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    accepted = jnp.cumprod(drafts == target[:, :-1], axis=1).sum(axis=1).astype(jnp.int32)
    return accepted, jnp.take_along_axis(target, accepted[:, None], axis=1)[:, 0]


def accept_sampled(p_logp, q_logp, drafts, key):
    """Speculative sampling: accept draft i with probability min(1, p(d_i) / q(d_i)); at the first
    rejection draw from normalise(max(p - q, 0)), after D acceptances from p at the last position.

    p_logp [B, D + 1, V]: the main model's sampling log-probabilities; q_logp [B, D, V]: the drafts'.
    -> (accepted [B], next token [B])."""
    B, D = drafts.shape
    k_accept, k_draw = jax.random.split(key)
    take = lambda lp: jnp.take_along_axis(lp, drafts[..., None], axis=-1)[..., 0]
    ratio = jnp.exp(take(p_logp[:, :D]) - take(q_logp))
    ok = jax.random.uniform(k_accept, (B, D)) < ratio
    accepted = jnp.cumprod(ok, axis=1).sum(axis=1).astype(jnp.int32)
    p = jnp.exp(p_logp)
    residual = jnp.maximum(p[:, :D] - jnp.exp(q_logp), 0.0)
    mass = residual.sum(-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.maximum(mass, 1e-30), p[:, :D])
    dist = jnp.concatenate([residual, p[:, D:]], axis=1)  # [B, D + 1, V]: drawn from at position `accepted`
    row = jnp.take_along_axis(dist, accepted[:, None, None], axis=1)[:, 0]
    return accepted, jax.random.categorical(k_draw, jnp.log(row), axis=-1).astype(jnp.int32)
