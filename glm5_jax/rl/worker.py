"""A rollout worker of an asynchronous RL run: a Ray actor that generates samples without pause, with the
newest weights it has been sent (docs/rl-async.md).

The worker asks the buffer (glm5_jax/rl/buffer.py) for work, decodes all its rows `segment_tokens` tokens at a
time with the cached decoder, and between segments: loads newer weights if the trainer pushed some (a sample
still generating continues with them: a *partial rollout*, its earlier tokens keeping the version and log-probs
they were drawn with), sends the finished samples to the reward service, and refills the rows that finished
with new work, so a long response never holds up the short ones. Each token records the weight version that
drew it and its log-probability under the sampling distribution (softmax(logits / temperature)), as the
decoder computed it. Scored samples go to the buffer.

The loop runs in a thread started by the constructor, so Ray's restart of a worker that died (kill -9) starts
generating again by itself; its first call to the buffer hands the work it held out again.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

POLL_S = 0.02  # seconds between looks at the buffer while there is nothing to generate


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs, sent from the trainer (picklable)."""

    model_cfg: object
    tokenizer_cfg: object
    temperature: float
    max_new_tokens: int
    max_length: int
    rows: int
    segment_tokens: int
    devices: int
    seed: int


@dataclasses.dataclass
class _Row:
    """A sample being generated."""

    work: object  # buffer.Work
    tokens: list  # prompt + response so far
    logprobs: list  # per response token
    versions: list  # per response token

    @property
    def left(self) -> int:
        return self.work.budget - len(self.logprobs)


class RolloutWorker:
    """Run as a Ray actor (`ray.remote(RolloutWorker)`); `index` names it to the buffer."""

    def __init__(self, index: int, spec: WorkerSpec, buffer, rewards, weights_like: dict):
        import jax

        from glm5_jax.data.tokenizer import build_tokenizer
        from glm5_jax.generate.runner import eos_ids
        from glm5_jax.rl.rollout import RolloutEngine
        from glm5_jax.sharding.context import Parallelism
        from sharding.layout import ParallelConfig

        self.index, self.spec, self.buffer, self.rewards, self.like = index, spec, buffer, rewards, weights_like
        devices = jax.devices()[:spec.devices]
        par = Parallelism.create(ParallelConfig(mesh={"data": len(devices)}), devices)
        self.engine = RolloutEngine(spec.model_cfg, par, temperature=spec.temperature,
                                    max_new_tokens=spec.max_new_tokens, max_length=spec.max_length)
        self.tokenizer = build_tokenizer(spec.tokenizer_cfg)
        self.eos = eos_ids(spec.model_cfg)
        self.version, self.generator, self.segments = -1, None, 0
        self.busy_s, self.started = 0.0, time.perf_counter()
        self.error: str | None = None
        self._stop = threading.Event()
        import ray

        ray.get(buffer.register.remote(index))  # (a restart: what the dead worker held is handed out again)
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"rollout-{index}")
        self.thread.start()

    def failure(self) -> str | None:
        """Why the loop stopped (None while it runs)."""
        return self.error

    def stop(self):
        self._stop.set()
        self.thread.join(timeout=30)

    def _loop(self):
        try:
            self._generate()
        except BaseException as e:  # noqa: BLE001 - reported to the trainer by `failure()`
            import traceback

            self.error = f"rollout worker {self.index}: {type(e).__name__}: {e}\n{traceback.format_exc()}"

    def _generate(self):
        import ray

        rows: list[_Row] = []
        scoring: list[tuple] = []  # (reward reference, samples)
        while not self._stop.is_set():
            self._load_newer_weights()
            if self.generator is None:
                time.sleep(POLL_S)
                continue
            free = self.spec.rows - len(rows)
            if free:
                rows += [_Row(w, list(w.prompt), [], []) for w in
                         ray.get(self.buffer.assign.remote(self.index, free))]
            scoring = self._deliver(scoring)
            if not rows:
                self.buffer.heartbeat.remote(self.index, self.busy_s, time.perf_counter() - self.started)
                time.sleep(POLL_S)
                continue
            start = time.perf_counter()
            finished = self._segment(rows)
            rows = [r for r in rows if r not in finished]
            if finished:
                samples = [self._sample(r) for r in finished]
                scoring.append((self.rewards.score.remote([(self._answer(s), r.work.item)
                                                            for s, r in zip(samples, finished)]), samples))
            self.busy_s += time.perf_counter() - start
            self.buffer.heartbeat.remote(self.index, self.busy_s, time.perf_counter() - self.started)
        self._deliver(scoring, wait=True)

    def _load_newer_weights(self):
        import ray

        from glm5_jax.rl.weights import fetch

        newer = ray.get(self.buffer.newer_weights.remote(self.version))
        if newer is None:
            return
        version, refs = newer
        named = fetch(refs, self.like)
        params = {k.split(":", 1)[1]: v for k, v in named.items() if k.startswith("params:")}
        buffers = {k.split(":", 1)[1]: v for k, v in named.items() if k.startswith("buffers:")}
        self.generator = self.engine.generator(params, buffers)
        self.version = version

    def _segment(self, rows: list[_Row]) -> list[_Row]:
        """Decode up to segment_tokens more tokens of every row; the rows that finished."""
        spec = self.spec
        room = spec.max_length - spec.max_new_tokens  # (prefill widths: this, then whole segments beyond it)
        longest = max(len(r.tokens) for r in rows)
        slots = min(spec.max_length - 1, room + spec.segment_tokens * -(-max(0, longest - room) // spec.segment_tokens))
        fill = spec.rows - len(rows)  # (a fixed batch: one decode program; the filler rows are dropped)
        prompts = [np.asarray(r.tokens, np.int32) for r in rows] + [np.asarray(rows[0].tokens, np.int32)] * fill
        limits = [max(1, min(spec.segment_tokens, r.left)) for r in rows] + [1] * fill
        self.segments += 1
        seed = int(np.random.SeedSequence([spec.seed, self.index, self.segments, time.time_ns()]).generate_state(1)[0])
        result = self.generator.generate(prompts, limits, spec.max_length, seed=seed, prompt_slots=slots)
        finished = []
        for r, seq, lp in zip(rows, result.sequences, result.token_logprobs):
            new = seq[len(r.tokens):]
            r.tokens += new.tolist()
            r.logprobs += lp.tolist()
            r.versions += [self.version] * len(new)
            if (len(new) and int(new[-1]) in self.eos) or r.left <= 0 or len(r.tokens) >= spec.max_length:
                finished.append(r)
        return finished

    def _sample(self, r: _Row):
        from glm5_jax.rl.rollout import Sample

        n, P = len(r.tokens), len(r.work.prompt)
        logprobs = np.zeros(n, np.float32)
        logprobs[P:] = r.logprobs
        versions = np.full(n, -1, np.int32)
        versions[P:] = r.versions
        return Sample(r.work.sample_id, r.work.group, r.work.prompt_index, np.asarray(r.tokens, np.int32), P,
                      np.arange(n) >= P, logprobs, int(min(r.versions)), finished=int(r.tokens[-1]) in self.eos,
                      sample_logprobs=logprobs, token_versions=versions)

    def _answer(self, sample) -> str:
        from glm5_jax.rl.setup import answer_ids

        return self.tokenizer.decode(answer_ids(sample, self.eos))

    def _deliver(self, scoring: list, wait: bool = False) -> list:
        """Samples whose rewards are in go to the buffer; the rest stay."""
        import ray

        if not scoring:
            return scoring
        ready, _ = ray.wait([ref for ref, _ in scoring], num_returns=len(scoring), timeout=None if wait else 0)
        done = set(ready)
        for ref, samples in scoring:
            if ref in done:
                for s, score in zip(samples, ray.get(ref)):
                    s.reward, s.failure = score.reward, (None if score.reward is not None else score.reason)
                self.buffer.put.remote(self.index, samples)
        return [(ref, s) for ref, s in scoring if ref not in done]
