#!/usr/bin/env bash
# The test command: set up .venv with the test extras, then run the whole suite on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --test || exit 1
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --durations=15 "$@" tests
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
