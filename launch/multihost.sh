#!/usr/bin/env bash
# Multi-host training by hand: run this same command on every host (one process per host); `glm5 train`
# joins the job itself when the environment describes one (docs/multihost.md has the table: explicit
# JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM, Open MPI, Kubernetes indexed jobs,
# Cloud TPU VMs, GLM5_DISTRIBUTED=auto). Every process must see the same recipe and the same run_dir
# (shared storage).
#
#   JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 bash launch/multihost.sh --config glm5
#
# Schedulers have their own scripts beside this one: slurm.sbatch, tpu_vm.sh, gke-jobset.yaml. On one
# machine, `glm5 launch local --processes 2 --devices-per-process 4 -- train --config quickstart` starts
# the processes for you (CPU devices, gloo collectives).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/glm5 train "$@"
