#!/usr/bin/env bash
# Create (or reuse) .venv with glm5-jax installed in editable mode. `--test` adds the test extras
# (transformers and the CPU build of PyTorch, the numerical oracle). Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # 2.13.0 is the CPU build of PyTorch (on this project's machines it is a local file); newer pins pull CUDA.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
