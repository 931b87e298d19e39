"""Joining a multi-process job: `jax.distributed.initialize()` when the environment says there are several
processes."""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when launched as one of several processes: a coordinator address in
    the environment (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID), a multi-task SLURM job,
    or a multi-host TPU VM. JAX's cluster detection fills in whatever is not given explicitly."""
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
    tpu = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    explicit = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
    if not (slurm or tpu or explicit or env.get("MEGASCALE_COORDINATOR_ADDRESS")):
        return False
    kwargs = {}
    if explicit:
        kwargs["coordinator_address"] = explicit
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True
