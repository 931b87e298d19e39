"""Ray for asynchronous RL (glm5_jax/rl/cluster.py, weights.py, reward_service.py): the local instance listens
on loopback only and code in the reward sandbox cannot reach it; weights travel in bounded buckets and arrive
bit-exact; the reward service runs calls concurrently up to its bound; stopping leaves no process behind."""

from __future__ import annotations

import ipaddress
import os
import time

import ml_dtypes
import numpy as np
import psutil
import pytest

from glm5_jax.rl import cluster, weights
from glm5_jax.rl.reward_service import reward_service

CONNECT = """
import socket
s = socket.socket({family})
s.settimeout(5)
s.connect({address!r})
print("connected")
"""


@pytest.fixture(scope="module")
def ray_local():
    info = cluster.start(num_cpus=2)
    assert info["started"]
    procs = psutil.Process().children(recursive=True)
    yield info
    cluster.stop()
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_local_ray_listens_on_loopback_only_and_the_sandbox_cannot_reach_it(ray_local):
    import ray

    assert ray.get(ray.remote(lambda: os.getpid()).remote()) != os.getpid()  # (a worker process exists)
    listening = [(p.pid, c.laddr) for p in psutil.Process().children(recursive=True)
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len({pid for pid, _ in listening}) >= 3  # the GCS, the raylet and workers at least
    assert all(_loopback(a.ip) for _, a in listening), listening
    host, port = ray_local["address"].rsplit(":", 1)
    assert host == cluster.LOOPBACK
    raylet = os.path.join(ray_local["session_dir"], "sockets", "raylet")
    assert os.path.exists(raylet)
    service = reward_service("tests.reward_fns:sandboxed", 2, 30)
    jobs = [(CONNECT.format(family="socket.AF_INET", address=(host, int(port))), {}),
            (CONNECT.format(family="socket.AF_UNIX", address=raylet), {}), ("print('fine')", {})]
    scores = ray.get(service.score.remote(jobs))
    assert [s.reward for s in scores] == [0.0, 0.0, 1.0], scores
    assert [s.reason for s in scores[:2]] == ["network access denied"] * 2, scores
    ray.get(service.close.remote())


def test_weights_travel_in_bounded_buckets_bit_exact(ray_local):
    rng = np.random.default_rng(0)
    named = {"params:a": rng.standard_normal((300, 70)).astype(np.float32),
             "params:b": rng.standard_normal((5, 9)).astype(ml_dtypes.bfloat16),
             "buffers:empty": np.zeros((0, 4), np.float32),
             "buffers:c": rng.integers(0, 9, (1000,), np.int32)}
    bucket = 10_000
    packed = weights.buckets(named, bucket)
    sizes = [sum(chunk.nbytes for _, _, chunk in b) for b in packed]
    total = sum(a.nbytes for a in named.values())
    assert max(sizes) <= bucket and sum(sizes) == total and len(packed) == -(-total // bucket)
    like = {k: (v.shape, v.dtype) for k, v in named.items()}
    got = weights.fetch(weights.publish(named, bucket), like)
    for k, v in named.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k].view(np.uint8), v.view(np.uint8))
    with pytest.raises(ValueError, match="weight push incomplete: params:a"):
        weights.fetch(weights.publish(named, bucket)[1:], like)


def test_reward_service_scores_concurrent_calls_up_to_its_bound(ray_local):
    import ray

    service = reward_service("tests.reward_fns:naps", 2, 30)
    ray.get(service.score.remote([("warm", {"nap": 0})] * 2))  # (both scorers loaded)
    nap = 1.0
    start = time.perf_counter()
    calls = [service.score.remote([("ab", {"nap": nap}), ("abc", {"nap": nap})]) for _ in range(2)]
    results = ray.get(calls)
    seconds = time.perf_counter() - start
    assert [[s.reward for s in r] for r in results] == [[2.0, 3.0]] * 2
    assert 2 * nap <= seconds < 4 * nap, seconds  # two at a time: neither one by one nor all four at once
    ray.get(service.close.remote())
