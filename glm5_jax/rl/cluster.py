"""Ray for asynchronous RL: a local instance that only this machine can reach, or an explicitly named cluster
(docs/rl-async.md, "Ray").

`start(None)` starts a new local Ray instance even where `RAY_ADDRESS` is set or another instance runs on the
machine (joining a cluster is never implicit): every server it starts advertises and binds 127.0.0.1 (Ray's
single-machine mode), token authentication as Ray 2.60 sets it up by default, no
dashboard unless asked, no usage statistics sent, and the workers' output stays in Ray's session logs
(`/tmp/ray/session_latest/logs`) instead of the trainer's console. `start(address)` joins the cluster at that
address, and `stop()` only disconnects from it. `stop()` after a local start waits until every process that
start made (Ray's servers, its workers and anything they started) has exited, killing what outlives a grace
period, so nothing is left behind.
"""

from __future__ import annotations

import os
import warnings

import psutil

LOOPBACK = "127.0.0.1"
GRACE_S = 15.0  # seconds Ray's processes get to exit on their own at stop() before they are killed

_started: dict = {}  # the local instance's pids, for stop(): {"pids": [...]} while one runs


def start(address: str | None = None, *, dashboard: bool = False, num_cpus: int | None = None) -> dict:
    """Start a local Ray instance (`address` None) or join the cluster at `address`. Returns {"started": whether
    this call started an instance (stop() then tears it down), "address": the GCS address, "session_dir": its
    logs' parent}. A process already connected to Ray keeps its connection (started False)."""
    if address is None:
        # Ray's single-machine mode (its default on macOS and Windows): every server takes the loopback address
        # as its node's and binds it alone. Checked below.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return {"started": False, "address": ray.get_runtime_context().gcs_address, "session_dir": None}
    if address is None:  # (where ray was imported before the variable was set, its constant says the same)
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    # JAX warns at any os.fork of a process that imported it; Ray forks its servers before any JAX work exists.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    if address is None:
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                           dashboard_host=LOOPBACK, log_to_driver=False, configure_logging=False)
        _started["pids"] = [p.pid for p in psutil.Process().children(recursive=True)]
        if context.address_info["node_ip_address"] != LOOPBACK:
            stop()
            raise RuntimeError(f"the local Ray instance took {context.address_info['node_ip_address']} as its "
                               "address, not loopback: this Ray release moved its single-machine switch")
    else:
        context = ray.init(address=address, log_to_driver=False, configure_logging=False)
    return {"started": address is None, "address": context.address_info["gcs_address"],
            "session_dir": context.address_info["session_dir"]}


def stop() -> None:
    """Disconnect; after a local start, also wait for every process it made to exit (killing stragglers)."""
    import ray

    pids = _started.pop("pids", [])
    procs = {p.pid: p for p in psutil.Process().children(recursive=True)}  # (workers started since, too)
    for pid in pids:
        try:
            procs.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    ray.shutdown()
    if not pids:
        return
    _, alive = psutil.wait_procs(list(procs.values()), timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=GRACE_S)
