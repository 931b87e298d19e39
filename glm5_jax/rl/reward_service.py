"""The reward service of asynchronous RL: one Ray actor scoring every rollout worker's samples with at most
`workers` rewards running at once (docs/rl-async.md).

Each of its `workers` sandbox-ready processes is a one-process `rewards.RewardPool` (its own timeout and
replacement of a hung or dead scorer); a call's jobs are spread over them and concurrent calls share them in
arrival order, so a slow reward (code execution) holds a scorer, never a rollout worker or the trainer.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

from glm5_jax.rl.rewards import RewardPool, Score

MAX_CALLS = 64  # calls the actor accepts at once; they queue on its `workers` scorers


class RewardService:
    """Scores (response, item) jobs with the reward `spec` in `workers` processes (a Ray actor's class)."""

    def __init__(self, spec: str, workers: int, timeout: float):
        self.pools: queue.SimpleQueue[RewardPool] = queue.SimpleQueue()
        self.all = [RewardPool(spec, 1, timeout) for _ in range(workers)]
        for p in self.all:
            self.pools.put(p)
        self.executor = ThreadPoolExecutor(workers)

    def _one(self, job: tuple[str, dict]) -> Score:
        pool = self.pools.get()
        try:
            return pool.score([job])[0]
        finally:
            self.pools.put(pool)

    def score(self, jobs: list[tuple[str, dict]]) -> list[Score]:
        """Scores of `jobs`, in input order (a sample's failure is its Score's error, never an exception)."""
        return list(self.executor.map(self._one, jobs))

    def close(self) -> None:
        self.executor.shutdown()
        for p in self.all:
            p.close()


def reward_service(spec: str, workers: int, timeout: float):
    """A RewardService actor (its handle); it asks Ray for no CPU: its scorers are its own processes."""
    import ray

    return ray.remote(RewardService).options(num_cpus=0, max_concurrency=MAX_CALLS).remote(spec, workers, timeout)
