#!/usr/bin/env bash
# On the lent GPU machine (Python 3.12, torch 2.11 preinstalled; no megatron-core, no Transformer
# Engine): gather the carried parts folders, join and sha256-check the wheels, install them with
# --no-deps into a target folder (torch stays the machine's), make megavlm importable from the
# checkout, and print the export line:
#     eval "$(bash tools/gpu/setup_gpu_env.sh)"
# Prepare on the CPU side with `bash tools/gpu/fetch_wheels.sh` and carry what wheels/manifest.json's
# "calls" say (tools/gpu/verify_all.sh does all of this itself).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
TARGET=${TARGET:-/tmp/megavlm-site}
PARTS=${VERIFY_PARTS:-/tmp/parts}
"$PY" tools/gpu/carry.py stash --checkout . --parts "$PARTS" --manifest wheels/manifest.json >&2
if [ ! -d "$TARGET/megatron" ]; then
  "$PY" tools/gpu/carry.py install --manifest wheels/manifest.json --parts "$PARTS" --joined /tmp/wheels-joined \
    --target "$TARGET" >&2
fi
# megavlm.kernels lives in kernels/ (setup.py maps it); a source checkout needs the link
[ -e megavlm/kernels ] || ln -s ../kernels megavlm/kernels
echo "export PYTHONPATH=$TARGET:$PWD${PYTHONPATH:+:$PYTHONPATH}"
