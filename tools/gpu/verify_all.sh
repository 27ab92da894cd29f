#!/usr/bin/env bash
# Every GPU check of megavlm in one device call of at most 8 minutes, after the carried wheels.
#
# Prepare on the CPU side:  bash tools/gpu/fetch_wheels.sh [--with-dali]   (prints the device calls)
#                           bash tools/gpu/verify_all.sh --cpu-dry-run      (the same, here, tiny shapes)
# On the GPU machine, in consecutive warm calls, each carrying the folder the manifest names:
#   bash tools/gpu/verify_all.sh --stash-only     # calls 1..N-1: keep this call's parts in /tmp/parts
#   bash tools/gpu/verify_all.sh [-- verify_all.py arguments]     # call N: install, then all checks
#
# The last call joins the pieces (sha256 against wheels/manifest.json), installs them with
# pip --no-index --no-deps --target (the machine's torch, triton, transformers stay its own), then
# runs tools/gpu/verify_all.py: tables on stdout, results in benchmarks/results/ and in $OUT.
set -euo pipefail
STARTED=$(date +%s)
cd "$(dirname "$0")/../.."
MODE=gpu
PYARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) MODE=dry ;;
    --stash-only) MODE=stash ;;
    --skip-wheels) SKIP_WHEELS=1 ;;
    --) shift; PYARGS+=("$@"); break ;;
    *) PYARGS+=("$1") ;;
  esac
  shift
done
MANIFEST=wheels/manifest.json
PARTS=${VERIFY_PARTS:-/tmp/parts}
SITE=${VERIFY_SITE:-/tmp/megavlm-site}

if [ "$MODE" = dry ]; then
  # This machine: its venv (Python 3.11, CPU torch) runs the checks; the wheels are only
  # unpacked for the GPU's Python 3.12 to prove they join, match and install.
  PY=${PYTHON:-.venv/bin/python}
  if [ -z "${SKIP_WHEELS:-}" ]; then
    [ -f "$MANIFEST" ] || { echo "no $MANIFEST: run bash tools/gpu/fetch_wheels.sh first (or --skip-wheels)" >&2; exit 1; }
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    "$PY" tools/gpu/carry.py stash --checkout . --parts "$TMP/parts" --manifest "$MANIFEST"
    "$PY" tools/gpu/carry.py install --all --manifest "$MANIFEST" --parts "$TMP/parts" --joined "$TMP/joined" \
      --target "$TMP/site" --cp312
    for must in megatron/core/__init__.py transformer_engine/pytorch/__init__.py \
                transformer_engine/wheel_lib/libtransformer_engine.so \
                transformer_engine/wheel_lib/transformer_engine_torch.cpython-312-x86_64-linux-gnu.so \
                pydantic/__init__.py pydantic_core/__init__.py nvdlfw_inspect/__init__.py; do
      [ -e "$TMP/site/$must" ] || { echo "dry run: $must missing from the installed wheels" >&2; exit 1; }
    done
    rm -rf "$TMP"
    echo "wheels: joined, sha256-checked and installed for cp312 into a scratch target (now removed)"
  fi
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec "$PY" tools/gpu/verify_all.py --cpu-dry-run --started "$STARTED" "${PYARGS[@]}"
fi

PY=${PYTHON:-python3}
if [ "$MODE" = stash ]; then
  exec "$PY" tools/gpu/carry.py stash --checkout . --parts "$PARTS" --manifest "$MANIFEST"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
if [ -z "${SKIP_WHEELS:-}" ]; then
  ENV_LINE=$(TARGET=$SITE VERIFY_PARTS=$PARTS bash tools/gpu/setup_gpu_env.sh)   # fails the script if it fails
  eval "$ENV_LINE"
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  [ -e megavlm/kernels ] || ln -s ../kernels megavlm/kernels
fi
export PYTHONUNBUFFERED=1
echo "setup took $(( $(date +%s) - STARTED )) s"
exec "$PY" tools/gpu/verify_all.py --started "$STARTED" "${PYARGS[@]}"
