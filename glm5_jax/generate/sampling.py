"""Sampling knobs: greedy, temperature, top-k, top-p, all applied to float32 logits inside the jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glm5_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the top_k
    most likely tokens (0: all) and then to the smallest set whose probability reaches top_p (1: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> Sampling:
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature: must be >= 0 (0 is greedy); got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k: must be >= 0 (0 keeps every token); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: must be in (0, 1]; got {self.top_p}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_probs(logits, s: Sampling):
    """Log-probabilities [..., V] of the sampling distribution (temperature, top-k, top-p applied)."""
    x = logits.astype(jnp.float32) / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1:
        order = jnp.argsort(-x, axis=-1)
        p_sorted = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
        before = jnp.cumsum(p_sorted, axis=-1) - p_sorted  # mass of the more likely tokens
        keep_sorted = before < s.top_p  # the most likely token always stays
        keep = jnp.zeros_like(keep_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
        x = jnp.where(keep, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def sample(logits, s: Sampling, key):
    """Token ids [...] from logits [..., V]: argmax when greedy, else a draw from `log_probs`."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, log_probs(logits, s), axis=-1).astype(jnp.int32)


def chosen_log_probs(logits, s: Sampling, tokens):
    """float32 [...] log-probability of `tokens` [...] under the distribution `sample` drew them from (logits
    [..., V]): `log_probs` at the token, 0 when greedy (a point mass)."""
    if s.greedy:
        return jnp.zeros(tokens.shape, jnp.float32)
    return jnp.take_along_axis(log_probs(logits, s), tokens[..., None], axis=-1)[..., 0]
