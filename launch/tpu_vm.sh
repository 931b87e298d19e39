#!/usr/bin/env bash
# glm5 train on a multi-host Cloud TPU VM slice: the same command on every worker, at once.
#
#   bash launch/tpu_vm.sh NAME ZONE --config glm5 run_dir=/mnt/shared/runs/glm5
#
# Each worker needs this repository at ~/glm5-jax with its venv (`bash launch/setup_env.sh`, then
# `.venv/bin/pip install 'jax[tpu]'`), and run_dir on storage every worker sees (a Filestore or other
# shared mount). GLM5_DISTRIBUTED=auto lets JAX find the slice's workers from the TPU metadata
# (docs/multihost.md). Rerunning the same command resumes from the last committed checkpoint.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash launch/tpu_vm.sh TPU_NAME ZONE --config RECIPE [key=value ...]" >&2
  exit 2
fi
name=$1 zone=$2
shift 2
args=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command="cd ~/glm5-jax && GLM5_DISTRIBUTED=auto .venv/bin/glm5 train $args"
