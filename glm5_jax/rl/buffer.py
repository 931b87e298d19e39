"""The asynchronous RL run's sample buffer: which prompts are generated next, the finished samples waiting to be
trained, and the weights the rollout workers are to load (docs/rl-async.md).

`SampleBuffer` is plain Python (its rules are tested without Ray); `glm5_jax/rl/async_feed.py` runs it as one
Ray actor that the rollout workers (glm5_jax/rl/worker.py) and the trainer call. Every sample has an id that
is a function of its group (the prompt draw it answers) and its place in it, so a sample generated twice (a
worker died with it in flight, or a run resumed) is recognised: the buffer keeps the first copy that arrives
and counts the other, and a sample once handed to the trainer is never handed out again.

Rules (GLM-5's): the trainer takes whole groups, oldest first, once enough are complete for a step. A sample
whose oldest token was drawn by weights more than `max_staleness` versions behind the trainer's is dropped
(`dropped_stale`), and so is a sample whose reward failed for environment reasons (`failed`). A group with more
than half of its samples left is filled up to its size by repeating them (`padded`); one with half or fewer is
dropped (`dropped_groups`). Generation runs at most `capacity` samples ahead of the trainer (the feed: max(1, tau)
steps' worth; samples further ahead would wait until they are stale).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Work:
    """One sample to generate: answer `prompt` (token ids) of prompt draw `group`, at most `budget` new tokens."""

    sample_id: int
    group: int
    prompt_index: int
    prompt: np.ndarray
    item: dict
    budget: int


COUNTERS = ("generated", "duplicates", "regenerated", "failed", "dropped_stale", "dropped_groups", "padded",
            "trained", "worker_starts", "launches")


class SampleBuffer:
    """prompts: the stage's `data.prompts.PromptSet`; budget(item) -> the response length bound of a prompt."""

    def __init__(self, prompts, group_size: int, max_staleness: int, capacity: int, budget, state: dict | None = None):
        self.prompts, self.G, self.tau, self.capacity, self.budget = prompts, group_size, max_staleness, capacity, budget
        self.next_group = 0  # prompt draws handed out so far
        self.queue: list[Work] = []  # work to hand out before new groups: regenerations
        self.outstanding: dict[int, dict[int, Work]] = {}  # worker -> sample id -> work in flight
        self.groups: dict[int, dict[int, object]] = {}  # group -> sample id -> finished Sample
        self.consumed: set[int] = set()  # groups handed to the trainer (or dropped)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.weights: tuple[int, list] | None = None  # (version, bucket references) of the newest push
        self.times: dict[int, tuple[float, float]] = {}  # worker -> (busy s, alive s) since it (re)started
        self.past_times = (0.0, 0.0)  # the same, summed over workers' earlier lives
        if state:
            self.next_group, self.consumed = state["next_group"], set(state["consumed"])
            self.counters.update(state["counters"])
            self.queue = [self._work(sid) for sid in state["in_flight"]]
            self.counters["regenerated"] += len(self.queue)
            for s in state["finished"]:
                self.groups.setdefault(s.group, {})[s.sample_id] = s
        self.counters["launches"] += 1  # (buffers this run has had: a resumed run's is its second)

    def _work(self, sample_id: int) -> Work:
        group = sample_id // self.G
        index = self.prompts.draw(group)
        item = self.prompts.train[index]
        return Work(sample_id, group, index, self.prompts.train_ids[index], item, self.budget(item))

    # -- rollout workers --------------------------------------------------------------------------------------

    def register(self, worker: int) -> int:
        """A worker (re)started: the work it held is handed out again; returns how much."""
        busy, alive = self.times.pop(worker, (0.0, 0.0))
        self.past_times = (self.past_times[0] + busy, self.past_times[1] + alive)
        lost = self.outstanding.pop(worker, {})
        self.queue[:0] = sorted(lost.values(), key=lambda w: w.sample_id)
        self.counters["regenerated"] += len(lost)
        self.counters["worker_starts"] += 1
        return len(lost)

    def assign(self, worker: int, n: int) -> list[Work]:
        """Up to n samples for `worker` to generate (fewer when generation is `capacity` samples ahead)."""
        ahead = sum(len(o) for o in self.outstanding.values()) + sum(len(g) for g in self.groups.values())
        n = max(0, min(n, self.capacity - ahead))
        out = self.queue[:n]
        del self.queue[:n]
        while len(out) < n:
            out += [self._work(self.next_group * self.G + j) for j in range(self.G)]
            self.next_group += 1
        self.queue[:0] = out[n:]  # (a group handed out in part: the rest goes first next time)
        out = out[:n]
        mine = self.outstanding.setdefault(worker, {})
        mine.update({w.sample_id: w for w in out})
        return out

    def heartbeat(self, worker: int, busy_s: float, alive_s: float) -> None:
        """A worker's seconds spent generating and alive, since it (re)started."""
        self.times[worker] = (busy_s, alive_s)

    def put(self, worker: int, samples: list) -> None:
        """Finished samples (`rollout.Sample`, reward set) from `worker`."""
        mine = self.outstanding.get(worker, {})
        for s in samples:
            mine.pop(s.sample_id, None)
            group = self.groups.setdefault(s.group, {})
            if s.group in self.consumed or s.sample_id in group:
                self.counters["duplicates"] += 1
                continue
            group[s.sample_id] = s
            self.counters["generated"] += 1

    def publish(self, version: int, refs: list) -> None:
        self.weights = (version, refs)

    def newer_weights(self, version: int) -> tuple[int, list] | None:
        """(version, bucket references) of the newest weights when newer than `version`, else None."""
        return self.weights if self.weights is not None and self.weights[0] > version else None

    # -- the trainer ------------------------------------------------------------------------------------------

    def take(self, n: int, version: int) -> tuple[list, list[int]] | None:
        """The samples of the next n // group_size groups (oldest first) for a step at weight version
        `version`, each group filled to its size, and each sample's staleness; None until that many groups are
        complete (stale and failed samples, and groups left with half or fewer, are dropped on the way)."""
        want, chosen = n // self.G, []
        for g in sorted(k for k, v in self.groups.items() if len(v) == self.G):
            if len(chosen) == want:
                break
            members = sorted(self.groups[g].values(), key=lambda s: s.sample_id)
            kept = [s for s in members if s.failure is None and version - s.version <= self.tau]
            if 2 * len(kept) > self.G:
                chosen.append((g, members, kept))
            else:  # (dead for good: failures stay, and staleness only grows)
                self._consume(g, members, kept)
                self.counters["dropped_groups"] += 1
        if len(chosen) < want:
            return None
        samples = []
        for g, members, kept in chosen:
            self._consume(g, members, kept)
            self.counters["padded"] += self.G - len(kept)
            samples += kept + [kept[i % len(kept)] for i in range(self.G - len(kept))]
        self.counters["trained"] += len(samples)
        return samples, [version - s.version for s in samples]

    def _consume(self, group: int, members: list, kept: list):
        failed = sum(s.failure is not None for s in members)
        self.counters["failed"] += failed
        self.counters["dropped_stale"] += len(members) - failed - len(kept)
        del self.groups[group]
        self.consumed.add(group)

    def stats(self) -> dict:
        busy = self.past_times[0] + sum(b for b, _ in self.times.values())
        alive = self.past_times[1] + sum(a for _, a in self.times.values())
        return {**self.counters, "buffered": sum(len(g) for g in self.groups.values()),
                "in_flight": sum(len(o) for o in self.outstanding.values()) + len(self.queue),
                "rollout_busy_s": busy, "rollout_alive_s": alive}

    def state(self) -> dict:
        """What a checkpoint keeps: finished samples not yet trained and the ids of those in flight (generated
        again after a resume), the prompt draws handed out, the groups consumed, the counters."""
        in_flight = sorted({w.sample_id for o in self.outstanding.values() for w in o.values()}
                           | {w.sample_id for w in self.queue})
        return {"next_group": self.next_group, "consumed": sorted(self.consumed), "counters": dict(self.counters),
                "in_flight": in_flight, "finished": [s for g in self.groups.values() for s in g.values()]}
