"""The batches of an asynchronous RL stage: samples that Ray rollout workers generate while the trainer trains
(docs/rl-async.md).

`glm5 train` reads them through the same feed protocol as every stage (`train.feed.Feed`). On the stage's first
batch the feed starts (or joins) Ray, the sample buffer actor (glm5_jax/rl/buffer.py), the reward service and
`rl.asynchronous.workers` rollout workers (glm5_jax/rl/worker.py). Before step s it pushes the trainer's weights
(version s) when s is a multiple of `push_every` from the stage's start, then waits until the buffer has a
step's worth of complete, fresh groups; their advantages, the trainer's old_logp (`grpo`: the trainer's own
scoring pass over the current weights, so IcePop's rho compares the trainer with the engines that sampled)
and the KL reference's log-probs make the batch. Each step's trained sample ids, their oldest versions and
staleness go to `RUN_DIR/samples.jsonl`; the checkpoint's data state holds the buffer's finished samples and
the ids of those in flight, so a resumed run loses none and trains none twice.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from glm5_jax.errors import ConfigError, TrainingStopped
from glm5_jax.rl import advantages as adv_lib
from glm5_jax.rl.feed import decode_array, encode_array
from glm5_jax.rl.objectives import rho_quantiles
from glm5_jax.rl.scoring import BASE_FIELDS, to_batch
from glm5_jax.rl.setup import item_budget
from glm5_jax.train.step import BATCH_AXES

POLL_S = 0.01  # seconds between looks at the buffer while the trainer waits
CHECK_S = 2.0  # seconds between looks at the workers' health while it waits
PLACE_S = 120  # seconds Ray gets to find room for the rollout workers
ARRAYS = ("tokens", "trained", "logprobs", "sample_logprobs", "token_versions")


def encode_sample(s) -> dict:
    import dataclasses

    d = dataclasses.asdict(s)
    return {k: encode_array(v) if k in ARRAYS and v is not None else v for k, v in d.items()}


def decode_sample(d: dict):
    from glm5_jax.rl.rollout import Sample

    return Sample(**{k: decode_array(v) if k in ARRAYS and v is not None else v for k, v in d.items()})


class AsyncRLFeed:
    """An asynchronous RL run's data feed (the `train.feed.Feed` protocol)."""

    ahead = False  # (a batch is taken after the previous step's weights were pushed)

    def __init__(self, run, setup, states: dict | None = None):
        if jax.process_count() > 1:
            raise ConfigError("rl.asynchronous: the trainer runs in one process (docs/rl-async.md)")
        self.run, self.setup, self.shards, self.indices = run, setup, 1, [0]
        self.saved = (states or {}).get("rl_async")
        self.reset_optimizer = False
        self.stage, self.actors, self.refs = None, None, []
        self.pushed: int | None = None
        self.report_next: dict = {}
        self.last_check = 0.0
        self.samples_path = os.path.join(os.path.abspath(run.recipe.run_dir), "samples.jsonl")
        # Ray starts here, before the trainer installs its SIGTERM handler (Ray's own would abort the process).
        from glm5_jax.rl import cluster

        a = next(iter(setup.rl.values())).asynchronous
        cpus = max(int(np.ceil(r.asynchronous.workers * r.asynchronous.worker_cpus)) + 1 for r in setup.rl.values())
        self.started = cluster.start(a.address, dashboard=a.dashboard, num_cpus=cpus)["started"]

    # -- starting ---------------------------------------------------------------------------------------------

    def _start(self, stage):
        import ray

        from glm5_jax.rl.buffer import SampleBuffer
        from glm5_jax.rl.reward_service import reward_service
        from glm5_jax.rl.worker import WorkerSpec

        self.close_actors()
        rl, a = self.setup.rl[stage.index], self.setup.rl[stage.index].asynchronous
        per_step = stage.data.global_batch
        state = None
        if self.saved:
            state = {**self.saved, "finished": [decode_sample(d) for d in self.saved["finished"]]}
        buffer = ray.remote(SampleBuffer).options(num_cpus=0).remote(
            self.setup.prompts[stage.index], rl.group_size, a.max_staleness, per_step * max(1, a.max_staleness),
            _Budget(rl.max_new_tokens), state)
        rewards = reward_service(rl.reward, rl.reward_workers, rl.reward_timeout)
        spec = WorkerSpec(stage.step.model_cfg, self.run.data_cfg.tokenizer, stage.step.loss_cfg.temperature,
                          rl.max_new_tokens, stage.data.seq_len, a.worker_rows or 2 * rl.group_size,
                          a.segment_tokens, a.worker_devices, self.run.recipe.seed)
        # (the workers start at the first push, which tells them the arrays' names, shapes and dtypes)
        self.actors = {"buffer": buffer, "rewards": rewards, "workers": [], "spec": spec,
                       "options": _worker_options(a, self.run.recipe.compilation_cache)}
        self.stage = stage

    def _start_workers(self, like: dict):
        """The rollout workers, one bundle each of a placement group (`rl.asynchronous.placement`)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from glm5_jax.rl.worker import RolloutWorker

        a, options = self.setup.rl[self.stage.index].asynchronous, self.actors["options"]
        bundle = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
        bundle = {k: v for k, v in bundle.items() if v}
        group = self.actors["group"] = placement_group([bundle] * a.workers, strategy=a.placement.upper())
        if not group.wait(timeout_seconds=PLACE_S):
            raise TrainingStopped(f"rl.asynchronous: Ray could not place {a.workers} rollout workers of {bundle} "
                                  f"({a.placement}) within {PLACE_S} s; the cluster has {ray.cluster_resources()}")
        actor = ray.remote(RolloutWorker)
        # (the constructor's larger arguments as objects this feed holds: a restarted worker reads them again)
        spec, like = self.actors["args"] = ray.put(self.actors["spec"]), ray.put(like)
        self.actors["workers"] = [
            actor.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(group, i))
            .remote(i, spec, self.actors["buffer"], self.actors["rewards"], like) for i in range(a.workers)]

    # -- the protocol -----------------------------------------------------------------------------------------

    def next_batch(self, stage, state):
        import ray

        if stage is not self.stage:
            self._start(stage)
        rl, a, spec = self.setup.rl[stage.index], self.setup.rl[stage.index].asynchronous, stage.step
        report = {}
        if self.pushed is None or (state.step != self.pushed
                                   and (state.step - stage.data.start_step) % a.push_every == 0):
            report.update(self._push(state, a))
        t0 = time.perf_counter()
        while (got := ray.get(self.actors["buffer"].take.remote(stage.data.global_batch, state.step))) is None:
            self._check_workers()
            time.sleep(POLL_S)
        waited = time.perf_counter() - t0
        samples, staleness = got
        batch, metrics = self._batch(stage, state, samples)
        stats = ray.get(self.actors["buffer"].stats.remote())
        hist = np.bincount(np.asarray(staleness), minlength=a.max_staleness + 1)
        report.update(metrics, **{f"staleness_{k}": int(c) for k, c in enumerate(hist)},
                      staleness_mean=float(np.mean(staleness)), staleness_max=int(np.max(staleness)),
                      wait_s=waited, **{k: stats[k] for k in ("dropped_stale", "dropped_groups", "failed", "padded",
                                                                 "regenerated", "duplicates", "buffered", "in_flight")},
                      worker_restarts=stats["worker_starts"] - a.workers * stats["launches"],
                      rollout_busy=stats["rollout_busy_s"] / max(stats["rollout_alive_s"], 1e-9))
        self.report_next = report
        self._record(state.step + 1, samples, staleness)
        shape = spec.batch_shape
        sharding = self.run.par.sharding(BATCH_AXES, shape)
        return {f: jax.device_put(batch[f].reshape(shape), sharding) for f in spec.fields}, spec.accumulate

    def _push(self, state, a) -> dict:
        """Publish the trainer's weights as version state.step, in buckets of at most push_bucket_mb."""
        import ray

        from glm5_jax.rl.weights import publish

        t0 = time.perf_counter()
        named = {f"params:{k}": np.asarray(jax.device_get(v)) for k, v in state.params.items()}
        named.update({f"buffers:{k}": np.asarray(jax.device_get(v)) for k, v in state.buffers.items()})
        refs = publish(named, int(a.push_bucket_mb * 2**20))
        ray.get(self.actors["buffer"].publish.remote(state.step, refs))
        self.refs = refs  # (kept until the next push replaces them)
        seconds = time.perf_counter() - t0
        if not self.actors["workers"]:
            self._start_workers({k: (v.shape, v.dtype) for k, v in named.items()})
        elif a.reset_optimizer:
            self.reset_optimizer = True
        self.pushed = state.step
        size = sum(v.nbytes for v in named.values())
        return {"push_s": seconds, "push_gb_s": size / seconds / 1e9, "pushed_version": state.step}

    def _check_workers(self):
        """Raise what stopped a worker's loop (a restarting worker is Ray's to bring back)."""
        import ray

        if time.monotonic() - self.last_check < CHECK_S:
            return
        self.last_check = time.monotonic()
        refs = [w.failure.remote() for w in self.actors["workers"]]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        for ref in ready:
            try:
                error = ray.get(ref)
            except ray.exceptions.RayActorError:
                continue  # (died: Ray restarts it)
            if error:
                raise TrainingStopped(error.splitlines()[0] + " (the worker's traceback follows)\n" + error)

    def _batch(self, stage, state, samples) -> tuple[dict, dict]:
        rl, L = self.setup.rl[stage.index], stage.data.seq_len
        rewards = np.array([s.reward for s in samples], np.float64)
        groups = np.array([s.group for s in samples])
        valid = np.ones(len(samples), bool)
        advantages = adv_lib.group_advantages(rewards, groups, valid, self.setup.normalize_std(stage))
        batch = {k: v[0] for k, v in to_batch(samples, L, len(samples), 1).items()}
        scored = batch["targets"] >= 0
        batch["advantages"] = np.where(scored, advantages[:, None], 0.0).astype(np.float32)
        metrics = {}
        if "old_logp" in stage.step.fields:  # grpo: the trainer's pi_old, its own program over these weights
            batch["old_logp"] = self.setup.engine(stage).scorer(state.params, state.buffers,
                                                                {k: batch[k] for k in BASE_FIELDS})
            batch["old_logp"] = np.where(scored, batch["old_logp"], 0.0).astype(np.float32)
            metrics.update(rho_quantiles(batch["old_logp"], batch["rollout_logp"], batch["targets"],
                                         (0.01, 0.5, 0.99, 1.0)))
            # Tokens the trainer's current weights drew: the engine's log-probs against the trainer's own.
            fresh = scored & (_target_versions(samples, L) == state.step)
            gap = np.abs(batch["old_logp"] - batch["rollout_logp"])[fresh]
            metrics["fresh_logp_gap_max"] = float(gap.max()) if gap.size else float("nan")
        batch.update(self.setup.extra_logprobs(stage, batch))
        lengths = np.array([len(s.tokens) - s.prompt_length for s in samples])
        metrics.update(adv_lib.reward_metrics(rewards, groups, valid), response_len_mean=float(lengths.mean()),
                       response_len_max=int(lengths.max()),
                       truncated_share=float(np.mean([not s.finished for s in samples])),
                       partial_share=float(np.mean([s.token_versions.max() > s.version for s in samples])))
        return batch, metrics

    def _record(self, step: int, samples, staleness):
        """One line of RUN_DIR/samples.jsonl: the step's samples (a group filled up repeats an id), the oldest
        and newest weight version that drew each, and its staleness."""
        with open(self.samples_path, "a") as f:
            f.write(json.dumps({"step": step, "sample_ids": [s.sample_id for s in samples],
                                "versions": [s.version for s in samples],
                                "newest": [int(s.token_versions.max()) for s in samples],
                                "staleness": [int(x) for x in staleness]}) + "\n")

    def report(self) -> dict:
        out, self.report_next = self.report_next, {}
        return out

    def state(self) -> dict:
        """The data state document: the buffer's finished samples and the ids in flight (`SampleBuffer.state`)."""
        import ray

        if self.actors is None:
            return {"shards": 1, "states": {"rl_async": self.saved}}
        s = ray.get(self.actors["buffer"].state.remote())
        s["finished"] = [encode_sample(x) for x in s["finished"]]
        return {"shards": 1, "states": {"rl_async": s}}

    def close_actors(self):
        import ray

        if self.actors is None:
            return
        stops = [w.stop.remote() for w in self.actors["workers"]]
        stops.append(self.actors["rewards"].close.remote())
        ray.wait(stops, num_returns=len(stops), timeout=30)
        for handle in self.actors["workers"] + [self.actors["buffer"], self.actors["rewards"]]:
            ray.kill(handle, no_restart=True)
        if "group" in self.actors:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.actors["group"])
        self.actors = None

    def close(self):
        from glm5_jax.rl import cluster

        try:
            self.close_actors()
        finally:
            if self.started:
                cluster.stop()
            self.setup.close()


def _target_versions(samples, L: int) -> np.ndarray:
    """[N, L] int32: the weight version of each target token of `to_batch(samples, L, ...)` (-1: none)."""
    out = np.full((len(samples), L), -1, np.int32)
    for i, s in enumerate(samples):
        out[i, :len(s.tokens) - 1] = s.token_versions[1:]
    return out


class _Budget:
    """A prompt's response length bound (`setup.item_budget`), picklable for the buffer actor."""

    def __init__(self, bound: int):
        self.bound = bound

    def __call__(self, item: dict) -> int:
        return item_budget(self.bound, item)


def _worker_options(a, cache: str | None) -> dict:
    """A rollout worker's Ray options: restarted when it dies, its devices, JAX told how many it has and where
    the recipe's compilation cache is (a restarted worker reads its programs back)."""
    platform = jax.devices()[0].platform
    env = {"PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    options = {"num_cpus": a.worker_cpus, "max_restarts": -1, "max_concurrency": 2}
    if platform == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={a.worker_devices}")
    elif platform == "gpu":
        options["num_gpus"] = a.worker_devices
    else:
        options["resources"] = {platform.upper(): a.worker_devices}
    options["runtime_env"] = {"env_vars": env}
    return options
