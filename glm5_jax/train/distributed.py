"""Joining a multi-process job: who the processes are (one place for every launcher), and
`jax.distributed.initialize` with timeouts that end in one clear line instead of a hang or an XLA abort.

`discover(env)` reads, in this order:

| source | process id | process count | coordinator |
|---|---|---|---|
| explicit variables | `JAX_PROCESS_ID` | `JAX_NUM_PROCESSES` | `JAX_COORDINATOR_ADDRESS` (host:port) |
| SLURM (`srun`, `SLURM_NTASKS` > 1) | `SLURM_PROCID` | `SLURM_NTASKS` | first host of `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST` |
| Open MPI (`mpirun`, `OMPI_COMM_WORLD_SIZE` > 1) | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | the launching host (`OMPI_MCA_orte_hnp_uri`) |
| Kubernetes indexed Job / JobSet | `JOB_COMPLETION_INDEX` | `JAX_NUM_PROCESSES` | `JAX_COORDINATOR_ADDRESS` |
| Cloud TPU VM (`TPU_WORKER_HOSTNAMES` with several) | `TPU_WORKER_ID` | number of hostnames | first hostname |
| `GLM5_DISTRIBUTED=auto` | JAX's own cluster detection (e.g. a TPU VM's metadata server) | | |

An explicit variable always wins over a scheduler's; the coordinator's port, where a scheduler gives only a
host, is `JAX_COORDINATOR_PORT` (default 8476). Nothing of these (or a count of 1): one process, no runtime.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import threading
import time

from glm5_jax.errors import DistributedError

DEFAULT_PORT = 8476



@dataclasses.dataclass(frozen=True)
class Launch:
    coordinator: str | None  # host:port (None: JAX's cluster detection finds everything)
    num_processes: int | None
    process_id: int | None
    source: str  # where the values came from, for messages: "JAX_* variables", "SLURM", ...

    def describe(self) -> str:
        if self.coordinator is None:
            return f"{self.source}"
        return (f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator} "
                f"(from {self.source})")


def _int(env, key: str, source: str) -> int:
    raw = env.get(key, "")
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{key}={raw!r} ({source}): must be an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-06,09],cpu1` -> `gpu03`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise DistributedError(f"SLURM node list {nodelist!r}: cannot read its first host")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def _with_port(host: str, env) -> str:
    return f"{host}:{env.get('JAX_COORDINATOR_PORT', DEFAULT_PORT)}"


def discover(env=None) -> Launch | None:
    """The launch this process is part of (see the module's table), or None for a single process."""
    env = os.environ if env is None else env
    count = lambda key, source: _int(env, key, source) if env.get(key) else 1
    explicit = env.get("JAX_COORDINATOR_ADDRESS")
    if env.get("SLURM_JOB_ID") and count("SLURM_NTASKS", "SLURM") > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        launch = Launch(explicit or _with_port(first_host(nodes), env), _int(env, "SLURM_NTASKS", "SLURM"),
                        _int(env, "SLURM_PROCID", "SLURM"), "SLURM")
    elif count("OMPI_COMM_WORLD_SIZE", "Open MPI") > 1:
        uri = env.get("OMPI_MCA_orte_hnp_uri", "")
        host = re.search(r"tcp://([^,:/]+)", uri)
        if not (explicit or host):
            raise DistributedError("Open MPI: no coordinator (OMPI_MCA_orte_hnp_uri unset); set "
                                   "JAX_COORDINATOR_ADDRESS=HOST:PORT")
        launch = Launch(explicit or _with_port(host.group(1), env), _int(env, "OMPI_COMM_WORLD_SIZE", "Open MPI"),
                        _int(env, "OMPI_COMM_WORLD_RANK", "Open MPI"), "Open MPI")
    elif env.get("JOB_COMPLETION_INDEX") and explicit:
        launch = Launch(explicit, None, _int(env, "JOB_COMPLETION_INDEX", "Kubernetes"), "Kubernetes indexed job")
    elif len(hosts := [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        launch = Launch(explicit or _with_port(hosts[0], env), len(hosts), _int(env, "TPU_WORKER_ID", "Cloud TPU"),
                        "Cloud TPU VM")
    elif explicit:
        launch = Launch(explicit, None, None, "JAX_* variables")
    elif env.get("GLM5_DISTRIBUTED", "") == "auto":
        return Launch(None, None, None, "JAX cluster auto-detection (GLM5_DISTRIBUTED=auto)")
    elif env.get("GLM5_DISTRIBUTED", ""):
        raise DistributedError(f"GLM5_DISTRIBUTED={env['GLM5_DISTRIBUTED']!r}: the only value is auto")
    else:
        return None
    # Explicit variables override what a scheduler said.
    n = _int(env, "JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES") if env.get("JAX_NUM_PROCESSES") else launch.num_processes
    i = _int(env, "JAX_PROCESS_ID", "JAX_PROCESS_ID") if env.get("JAX_PROCESS_ID") else launch.process_id
    launch = dataclasses.replace(launch, num_processes=n, process_id=i)
    if n is None:
        raise DistributedError(f"JAX_NUM_PROCESSES: not set ({launch.source} with JAX_COORDINATOR_ADDRESS="
                               f"{explicit}); set it to the number of processes")
    if i is None:
        raise DistributedError(f"JAX_PROCESS_ID: not set ({launch.source}); set it to 0..{n - 1}")
    if n < 1 or not 0 <= i < n:
        raise DistributedError(f"process id {i} / process count {n} ({launch.source}): the id must be in "
                               f"0..count-1 and the count at least 1")
    if ":" not in launch.coordinator:
        raise DistributedError(f"coordinator address {launch.coordinator!r} ({launch.source}): must be HOST:PORT")
    return launch


def _reachable(address: str, deadline: float) -> bool:
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)


def _fail_after(seconds: float, message: str) -> threading.Timer:
    """One line on stderr and exit status 2 after `seconds` unless cancelled: XLA's own timeouts abort the
    process with a stack trace, and Python cannot catch that."""
    def fire():
        sys.stdout.flush()
        print(f"glm5: error: {message}", file=sys.stderr, flush=True)
        os._exit(2)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def initialize(launch: Launch, init_timeout: float, peer_timeout: float) -> None:
    """`jax.distributed.initialize` for `launch`; every way the job can fail to form is one line and exit
    status 2 within `init_timeout` seconds. JAX's heartbeat timeout is twice `peer_timeout`, so the peer
    monitor (`glm5_jax.train.peers`) reports a lost process before JAX's own abort does."""
    import jax

    heartbeat = int(max(2 * peer_timeout, 10))
    kwargs = dict(initialization_timeout=int(init_timeout) + 30, heartbeat_timeout_seconds=heartbeat)
    if launch.coordinator is None:  # JAX finds everything (and reports what it cannot)
        jax.distributed.initialize(**kwargs)
        return
    deadline = time.monotonic() + init_timeout
    if launch.process_id != 0 and not _reachable(launch.coordinator, deadline):
        raise DistributedError(f"coordinator {launch.coordinator} ({launch.source}) not reachable within "
                               f"{init_timeout:g} s (distributed.init_timeout): is process 0 running, and is the "
                               f"address right?")
    timer = _fail_after(max(deadline - time.monotonic(), 1.0),
                        f"the job did not form within {init_timeout:g} s (distributed.init_timeout): {launch.describe()}"
                        f"; not every one of the {launch.num_processes} processes joined (check the process count "
                        f"and that every process started)")
    try:
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id, **kwargs)
    finally:
        timer.cancel()
    _check_agreement(launch)


def _check_agreement(launch: Launch) -> None:
    """Every process must have been told the same process count (the coordinator's wins silently otherwise)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    told = np.asarray(multihost_utils.process_allgather(np.array([launch.num_processes], np.int64))).reshape(-1)
    if jax.process_count() != launch.num_processes or len(set(told.tolist())) > 1:
        by = ", ".join(f"process {p}: {int(n)}" for p, n in enumerate(told))
        raise DistributedError(f"process count: the processes disagree ({by}; {jax.process_count()} joined); "
                               f"every process needs the same JAX_NUM_PROCESSES")


def maybe_initialize_distributed(init_timeout: float = 300.0, peer_timeout: float = 60.0) -> Launch | None:
    """Join the job the environment describes (`discover`), if any; returns the launch (None: one process)."""
    import jax

    launch = discover()
    if launch is None or launch.num_processes == 1:
        return None
    if jax.distributed.is_initialized():
        return launch
    initialize(launch, init_timeout, peer_timeout)
    return launch
