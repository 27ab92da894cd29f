#!/usr/bin/env bash
# The test command (README, .ci/run): sets up .venv from nothing, then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m "not multiproc"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
