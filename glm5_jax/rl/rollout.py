"""The RL rollout engine: G samples per prompt from the current weights, token in, token out.

Tokens are drawn by the cached decoder (`glm5_jax.generate.runner.Generator`, in the engine's layout, with
the weights of each call and no recompilation); each sample's recorded log-probs then come from a scoring
pass, a `Scorer` over prompt + response in the same layout, right after generation, so the trainer's own
`Scorer` on the same layout and dtype reproduces them bit for bit (docs/post-training.md, "Rollouts").
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from glm5_jax.checkpoint.naming import to_state
from glm5_jax.errors import ConfigError
from glm5_jax.generate.runner import Generator, check_max_length, eos_ids
from glm5_jax.generate.sampling import Sampling
from glm5_jax.rl.scoring import BASE_FIELDS, Scorer, to_batch
from glm5_jax.sharding.context import Parallelism


@dataclasses.dataclass
class Sample:
    """One response to one prompt. Arrays have one entry per token of `tokens`; entry t of `logprobs` is
    log pi(tokens[t] | tokens[:t]), 0 where the token is not trained."""

    sample_id: int
    group: int  # the prompt's index in its rollout batch: the samples a group-relative advantage compares
    prompt_index: int  # the prompt's position in its source
    tokens: np.ndarray  # int32: prompt + response, exactly as generated
    prompt_length: int
    trained: np.ndarray  # bool: tokens the model wrote and that train (prompt and tool results: False)
    logprobs: np.ndarray  # float32: recorded by the scoring pass
    version: int  # the weight version that generated it (with several: the oldest, the one staleness counts)
    finished: bool  # ended by an EOS, not by the length cap
    reward: float | None = None
    failure: str | None = None  # why the sample cannot be trained on (it then trains nothing)
    sample_logprobs: np.ndarray | None = None  # float32: the decoder's own log-probs (same places), for logging
    # int32 per token: the weight version that drew it (-1: the prompt); None: every token drew from `version`.
    # An asynchronous rollout that continues with newer weights (a partial rollout) has several.
    token_versions: np.ndarray | None = None

    @property
    def response(self) -> np.ndarray:
        return self.tokens[self.prompt_length:]


def check_prompts(prompts, max_length: int, prompt_indices=None):
    """ConfigError (one line) for the first prompt that is empty or leaves no room to generate in
    `max_length` tokens; prompt_indices: the prompts' positions in their source (default 0, 1, ...)."""
    for i, p in enumerate(prompts):
        where = f"prompt {i if prompt_indices is None else prompt_indices[i]}"
        if len(p) == 0:
            raise ConfigError(f"{where}: empty")
        if len(p) > max_length - 1:
            raise ConfigError(f"{where}: {len(p)} tokens; max_length {max_length} leaves room for prompts of "
                              f"at most {max_length - 1}")


def check_sampling(temperature: float, top_k: int = 0, top_p: float = 1.0):
    """RL samples from softmax(logits / temperature) itself, the distribution the objectives score."""
    if not temperature > 0:
        raise ConfigError(f"temperature: RL samples at a temperature > 0; got {temperature}")
    if top_k != 0 or top_p != 1:
        raise ConfigError(f"top_k {top_k}, top_p {top_p}: RL samples by temperature only (top_k 0, top_p 1), "
                          f"so that the scored distribution is the one sampled")


class RolloutEngine:
    """`generate(params, buffers, prompts, group_size, version, seed, first_sample_id, prompt_indices)`:
    `group_size` samples per prompt from the weights given (flat {dotted name: array} dicts), in layout `par`.

    A sample is at most `max_length` tokens (prompt + response); a response at most `max_new_tokens`. In one
    layout the result is a function of (weights, prompts, seed, group_size); every row draws its own tokens.
    The scoring pass scores batches [score_rows, max_length] (default: all of a call's samples in one batch);
    a trainer whose microbatches have that shape (`to_batch(samples, max_length, score_rows, ...)`) in the
    same layout and dtype reproduces the recorded log-probs bit for bit."""

    def __init__(self, model_cfg, par: Parallelism, *, temperature: float, max_new_tokens: int, max_length: int,
                 score_rows: int | None = None, top_k: int = 0, top_p: float = 1.0):
        check_sampling(temperature, top_k, top_p)
        check_max_length(model_cfg, max_length)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1; got {max_new_tokens}")
        if score_rows is not None and score_rows < 1:
            raise ConfigError(f"score_rows: must be >= 1; got {score_rows}")
        self.cfg, self.par, self.score_rows = model_cfg, par, score_rows
        self.temperature, self.max_new_tokens, self.max_length = temperature, max_new_tokens, max_length
        # Prompts are prefilled max_length - max_new_tokens wide when they fit it: one prefill program for all.
        self.prompt_slots = max(1, max_length - max_new_tokens)
        self.scorer = Scorer(model_cfg, par, temperature)
        self.abstract = self.scorer.abstract
        self._generator: Generator | None = None  # built on the first call, then given each call's weights

    def generator(self, params: dict, buffers: dict) -> Generator:
        """The decoder holding these weights (compiled programs shared across calls)."""
        model = nnx.merge(self.abstract.graphdef, to_state(params, self.abstract.params),
                          to_state(buffers, self.abstract.buffers))
        if self._generator is None:
            self._generator = Generator(model, Sampling(temperature=self.temperature), par=self.par)
            return self._generator
        return self._generator.with_state(nnx.split(model)[1])

    @property
    def compiles(self) -> int:
        """Programs compiled so far: the decoder's (prefill, decode step) and the scoring pass's."""
        return (0 if self._generator is None else self._generator.compiles) + self.scorer.compiles

    def generate(self, params: dict, buffers: dict, prompts: list[np.ndarray], group_size: int, version: int,
                 seed: int, first_sample_id: int, prompt_indices: list[int],
                 budgets: list[int] | None = None) -> list[Sample]:
        """Samples first_sample_id, ...: group_size per prompt, prompt after prompt; their `logprobs` from
        the scoring pass over the weights that generated them. budgets: each prompt's response length bound
        (default max_new_tokens for all)."""
        if len(prompt_indices) != len(prompts):
            raise ConfigError(f"prompt_indices: {len(prompt_indices)} for {len(prompts)} prompts")
        if group_size < 1:
            raise ConfigError(f"group_size: must be >= 1; got {group_size}")
        check_prompts(prompts, self.max_length, prompt_indices)
        rows = [np.asarray(p, np.int32) for p in prompts for _ in range(group_size)]
        limits = [self.max_new_tokens if budgets is None else min(budgets[i // group_size], self.max_new_tokens)
                  for i in range(len(rows))]
        result = self.generator(params, buffers).generate(rows, limits, self.max_length, seed=seed,
                                                          prompt_slots=self.prompt_slots)
        eos = set(eos_ids(self.cfg))
        samples = []
        for i, (seq, decoded) in enumerate(zip(result.sequences, result.token_logprobs)):
            n, P = len(seq), len(rows[i])
            trained = np.arange(n) >= P
            recorded = np.zeros(n, np.float32)
            recorded[P:] = decoded
            samples.append(Sample(first_sample_id + i, i // group_size, prompt_indices[i // group_size],
                                  seq.astype(np.int32), P, trained, np.zeros(n, np.float32), version,
                                  finished=int(seq[-1]) in eos, sample_logprobs=recorded))
        self.score(params, buffers, samples)
        return samples

    def score(self, params: dict, buffers: dict, samples: list[Sample]):
        """Fill each sample's `logprobs`: the scoring pass over batches [score_rows, max_length]."""
        rows = self.score_rows or len(samples)
        for start in range(0, len(samples), rows):
            chunk = samples[start:start + rows]
            batch = to_batch(chunk, self.max_length, rows, 1)
            logp = self.scorer(params, buffers, {k: batch[k][0] for k in BASE_FIELDS})
            for i, s in enumerate(chunk):
                s.logprobs = np.zeros(len(s.tokens), np.float32)
                s.logprobs[1:] = np.where(s.trained[1:], logp[i, :len(s.tokens) - 1], 0.0)
