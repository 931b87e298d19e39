#!/usr/bin/env bash
# Multi-host training: run this same command on every host (one process per host); `glm5 train` calls
# jax.distributed.initialize() itself when it finds the environment of a multi-process launch:
#   - explicit: JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i (any launcher);
#   - SLURM: srun with SLURM_NTASKS > 1 (one task per host); JAX reads the node list and task ids;
#   - Cloud TPU VMs: TPU_WORKER_HOSTNAMES with several workers (gcloud ... tpu-vm ssh --worker=all);
#   - multi-slice: MEGASCALE_COORDINATOR_ADDRESS.
# Every process must see the same recipe and the same run_dir (a shared file system or GCS path): Orbax
# writes each process's shards and the data iterator state of each process (one file per process).
#
#   SLURM:    srun --nodes=4 --ntasks-per-node=1 bash launch/multihost.sh --config glm5 run_dir=/shared/run
#   TPU VM:   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd glm5-jax && bash launch/multihost.sh --config glm5"
#   by hand:  JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 bash launch/multihost.sh ...
#   one host, N processes on CPU (a rehearsal): for i in 0 1; do JAX_COORDINATOR_ADDRESS=localhost:1234 \
#       JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i bash launch/multihost.sh --config quickstart & done; wait
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/glm5 train "$@"
