#!/usr/bin/env bash
# Create (or reuse) .venv with glm5-jax installed in editable mode. `--test` adds the test extras
# (transformers and the CPU build of PyTorch, the numerical oracle), the `tpu` extra (libtpu, the TPU
# compiler `glm5 plan --target tpu:...` uses; tests/test_plan_tpu.py) and the `gpu-plan` extra (jax's CUDA
# plugin, the GPU compiler of `--target gpu:...`; tests/test_plan_gpu.py). Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # 2.13.0 is the CPU build of PyTorch (on this project's machines it is a local file); newer pins pull CUDA.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  # The tpu extra pins the libtpu of the installed jax; where that libtpu has no wheel for this Python, say so:
  # the TPU compile test then skips (it skips only when libtpu is not installed).
  if ! .venv/bin/python -m pip install -q -e ".[test,tpu]"; then
    echo "setup_env.sh: the tpu extra (libtpu for $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')) does not install on $(.venv/bin/python -V); glm5 plan --target tpu and its test are unavailable" >&2
  fi
  if ! .venv/bin/python -m pip install -q -e ".[test,gpu-plan]"; then
    echo "setup_env.sh: the gpu-plan extra (jax's CUDA plugin) does not install on $(.venv/bin/python -V); glm5 plan --target gpu and its test are unavailable" >&2
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
