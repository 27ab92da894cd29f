#!/usr/bin/env bash
# On the lent GPU machine (Python 3.12, torch 2.11 preinstalled, no megatron-core): install the
# carried megatron-core wheel without dependencies (torch stays the machine's) and make megavlm
# importable from the checkout. Fetch the wheel beforehand on the CPU machine with
#   bash tools/gpu/fetch_wheels.sh          (writes the git-ignored wheels/ folder)
# and carry wheels/ with the device call.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${TARGET:-/tmp/megavlm-deps}
if [ ! -d "$TARGET/megatron" ]; then
  python -m pip install --quiet --no-deps --target "$TARGET" wheels/megatron_core-0.16.1-cp312-*.whl
fi
python - <<'PY'
import pathlib, sysconfig
# megavlm.kernels lives in kernels/ (setup.py maps it); mirror that for a source checkout.
link = pathlib.Path("megavlm/kernels")
if not link.exists():
    link.symlink_to(pathlib.Path("../kernels"))
PY
echo "export PYTHONPATH=$TARGET:$PWD"
