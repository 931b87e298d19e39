"""Generation driver: prompts in, sequences out, with plain or MTP speculative decoding.

Each jitted function is compiled once per shape before the timed loop (prefill per padded prompt length,
one decode step reused for every token), so tokens per second count decoding only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5_jax.errors import ConfigError
from glm5_jax.generate import speculative
from glm5_jax.generate import step as step_lib
from glm5_jax.generate.sampling import Sampling, chosen_log_probs, sample
from glm5_jax.sharding.context import Parallelism, use


@dataclasses.dataclass
class GenerationResult:
    sequences: list[np.ndarray]  # per row: prompt + generated ids (int32), up to and including an EOS
    prompt_lengths: list[int]
    decode_seconds: float  # wall time of the decode loop (compiled before it starts)
    steps: int  # decode steps (main-model forwards after the prefill)
    accepted: float | None = None  # speculative: mean tokens committed per row per step (accepted + 1)
    logits: list[np.ndarray] | None = None  # per row [generated, V]: the logits each generated token came from
    # per row [generated] float32: each generated token's log-probability under the distribution it was drawn
    # from (0: greedy); None with speculative decoding
    token_logprobs: list[np.ndarray] | None = None

    @property
    def generated(self) -> int:
        return sum(len(s) - n for s, n in zip(self.sequences, self.prompt_lengths))

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    def padded(self, pad_id: int) -> np.ndarray:
        """The sequences as one int32 array [batch, longest], shorter rows filled with `pad_id`."""
        out = np.full((len(self.sequences), max(len(s) for s in self.sequences)), pad_id, np.int32)
        for i, s in enumerate(self.sequences):
            out[i, :len(s)] = s
        return out


def check_max_length(cfg, max_length: int):
    if max_length > cfg.max_position_embeddings:
        raise ConfigError(f"--max-length: {max_length} exceeds the model's max_position_embeddings "
                          f"({cfg.max_position_embeddings})")


def eos_ids(cfg) -> tuple[int, ...]:
    e = cfg.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def prefill_all(model, ids, lengths, cache_length: int, with_mtp: bool):
    """Prefill prompts ids [B, P] (real up to `lengths`) into a cache of `cache_length` slots.

    -> (logits [B, V] at each row's last prompt token, DecodeCache, and with `with_mtp` the MTP caches
    filled and the main model's final-normed hidden states [B, cache_length, D] the drafts read; else
    None)."""
    logits, hidden, cache = step_lib.prefill(model, ids, lengths, cache_length)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if not with_mtp:
        return last, cache, None
    cache = step_lib.mtp_prefill(model, ids, lengths, hidden, cache)
    return last, cache, jnp.pad(hidden, ((0, 0), (0, cache_length - hidden.shape[1]), (0, 0)))


class Generator:
    """Generate from a GLM5 model; with `par` the weights, cache and batch follow that layout."""

    def __init__(self, model, sampling: Sampling | None = None, *, speculative_mtp: bool = False,
                 par: Parallelism | None = None):
        cfg, sampling = model.cfg, Sampling() if sampling is None else sampling  # (None: greedy)
        if speculative_mtp and model.mtp is None:
            raise ConfigError("--speculative mtp: the checkpoint has no MTP layer (num_nextn_predict_layers 0)")
        self.cfg, self.sampling, self.speculative, self.par = cfg, sampling.validate(), speculative_mtp, par
        graphdef, state = nnx.split(model)
        self.state = self._place(state)
        merge = lambda st: nnx.merge(graphdef, st)
        s = self.sampling

        def drawn(logits, key):  # a token per row and its log-probability under the sampling distribution
            token = sample(logits, s, key)
            return token, chosen_log_probs(logits, s, token)

        def prefill(st, ids, lengths, key, cache_length):
            logits, cache, hidden = prefill_all(merge(st), ids, lengths, cache_length, speculative_mtp)
            return *drawn(logits, key), logits, cache, hidden

        def decode(st, cache, ids, positions, key):
            logits, _, cache = step_lib.decode(merge(st), cache, ids, positions)
            return *drawn(logits[:, -1], key), logits[:, -1], cache

        def spec_step(st, cache, hidden, seq, n, key):
            return speculative.step(merge(st), cache, hidden, seq, n, s, key)[:4]

        self._compiled = {}  # (step, batch, cache length) -> executable: one compile per shape
        self._prefill = jax.jit(prefill, static_argnums=4)
        self._decode = jax.jit(decode, donate_argnums=1)
        self._spec = jax.jit(spec_step, donate_argnums=(1, 2))

    def _place(self, state):
        if self.par is None:
            return state
        from glm5_jax.model.state import state_shardings

        return jax.device_put(state, state_shardings(state, self.par))

    def with_state(self, state) -> Generator:
        """This generator with other weights (an nnx State of the same model: `nnx.split(model)[1]`), placed in
        its layout; it shares the compiled programs, so new weights (an RL step's) never recompile."""
        new = copy.copy(self)
        new.state = self._place(state)
        return new

    @property
    def compiles(self) -> int:
        """Programs compiled so far: a prefill and a decode (or speculative) step per batch and cache shape."""
        return self._prefill._cache_size() + len(self._compiled)

    def _compile(self, fn, args, batch: int, length: int):
        """fn compiled ahead of time for these argument shapes (before the timed loop), reused by later calls."""
        key = (fn, batch, length)
        if key not in self._compiled:
            self._compiled[key] = fn.lower(*args).compile()
        return self._compiled[key]

    def _put(self, x, axes):
        if self.par is None:
            return jnp.asarray(x)
        return jax.device_put(x, self.par.sharding(axes, x.shape))

    def generate(self, prompts, max_new_tokens: int, max_length: int | None = None, *,
                 return_logits: bool = False, seed: int | None = None,
                 prompt_slots: int | None = None) -> GenerationResult:
        """Continue each prompt (a 1-D int array) by up to `max_new_tokens` (one bound, or one per prompt),
        stopping a row at an EOS id.

        max_length: cache slots (default longest prompt + max_new_tokens); rows stop when full.
        return_logits: also keep, per generated token, the logits it was chosen from (plain decoding).
        seed: the sampling seed of this call (default the `Sampling`'s).
        prompt_slots: prefill at least this many positions (prompts right-padded to it), so that calls with
        prompts of any length up to it share one compiled prefill (RL rollouts); default the longest prompt."""
        cfg, s = self.cfg, self.sampling
        lengths = np.array([len(p) for p in prompts], np.int32)
        B, P = len(prompts), max(int(lengths.max()), prompt_slots or 0)
        limit = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (B,))
        if limit.min() < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1; got {int(limit.min())}")
        T = max_length or P + int(limit.max())
        check_max_length(cfg, T)
        if T <= P:
            raise ConfigError(f"--max-length: {T} leaves no room after the longest prompt ({P} tokens)")
        extra = -B % (self.par.axis_size("batch") if self.par is not None else 1)
        if extra:  # fill the last batch shard with copies of the last prompt, dropped from the result
            r = self.generate(list(prompts) + [prompts[-1]] * extra, np.concatenate([limit, limit[-1:].repeat(extra)]),
                              T, return_logits=return_logits, seed=seed, prompt_slots=prompt_slots)
            return dataclasses.replace(r, sequences=r.sequences[:B], prompt_lengths=r.prompt_lengths[:B],
                                       logits=None if r.logits is None else r.logits[:B],
                                       token_logprobs=None if r.token_logprobs is None else r.token_logprobs[:B])
        if return_logits and self.speculative:
            raise ConfigError("return_logits: not kept with speculative decoding")
        seq = np.zeros((B, T), np.int32)
        for i, p in enumerate(prompts):
            seq[i, :len(p)] = p
        eos = np.array(eos_ids(cfg) or [-1])
        key = jax.random.key(s.seed if seed is None else seed)
        with use(self.par) if self.par is not None else contextlib.nullcontext():
            token, lp, last, cache, hidden = self._prefill(self.state, self._put(seq[:, :P], ("batch", None)),
                                                           self._put(lengths, ("batch",)), jax.random.fold_in(key, 0),
                                                           T)
            n = lengths.copy()  # per row: index of the newest token; positions below it are in the cache
            seq[np.arange(B), n] = np.asarray(token)
            logits = [[np.asarray(last[i])] for i in range(B)] if return_logits else None
            token_lp = None if self.speculative else [[float(v)] for v in np.asarray(lp)]
            done = np.isin(seq[np.arange(B), n], eos) | (n + 1 >= T) | (limit <= 1)
            produced = np.ones(B, np.int64)
            steps, row_steps, committed = 0, 0, 0  # committed: tokens from decode steps, summed over rows
            compiled, start = None, None
            while not done.all():
                k = jax.random.fold_in(key, steps + 1)
                if self.speculative:
                    args = (self.state, cache, hidden, self._put(seq, ("batch", None)), self._put(n, ("batch",)), k)
                    compiled = compiled or self._compile(self._spec, args, B, T)
                    start = start or time.perf_counter()
                    tokens, accepted, cache, hidden = compiled(*args)
                    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
                else:
                    args = (self.state, cache, self._put(seq[np.arange(B), n][:, None], ("batch", None)),
                            self._put(n[:, None], ("batch", None)), k)
                    compiled = compiled or self._compile(self._decode, args, B, T)
                    start = start or time.perf_counter()
                    token, lp, last, cache = compiled(*args)
                    tokens, accepted, lp = np.asarray(token)[:, None], np.zeros(B, np.int32), np.asarray(lp)
                steps += 1
                for i in np.flatnonzero(~done):
                    row_steps += 1
                    for t in tokens[i, :accepted[i] + 1]:
                        n[i] += 1
                        seq[i, n[i]] = t
                        produced[i] += 1
                        committed += 1
                        if logits is not None:
                            logits[i].append(np.asarray(last[i]))
                        if token_lp is not None:
                            token_lp[i].append(float(lp[i]))
                        if t in eos or produced[i] >= limit[i] or n[i] + 1 >= T:
                            done[i] = True
                            break
            seconds = time.perf_counter() - start if start is not None else 0.0
        sequences = [seq[i, :n[i] + 1].copy() for i in range(B)]
        result = GenerationResult(sequences, lengths.tolist(), seconds, steps,
                                  logits=[np.stack(l) for l in logits] if logits is not None else None,
                                  token_logprobs=None if token_lp is None else
                                  [np.array(l, np.float32) for l in token_lp])
        if self.speculative and row_steps:
            result.accepted = committed / row_steps  # tokens a row commits per step (accepted drafts + 1)
        return result
