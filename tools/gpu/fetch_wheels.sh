#!/usr/bin/env bash
# CPU side, before a GPU session: download the cp312 wheels the GPU machine lacks (it reaches no
# package index; its torch, triton, transformers, numpy... stay its own, so every download is
# --no-deps and nothing here pulls a torch), pack them into folders of at most ~60 MB (pieces of at
# most 50 MB) and write wheels/manifest.json: sha256 of every wheel and piece and the ordered list of
# device calls (which folder each call carries). All of it is git-ignored (/wheels*/, /parts*/).
#
#   bash tools/gpu/fetch_wheels.sh            # core: megatron-core + Transformer Engine (+ its needs)
#   bash tools/gpu/fetch_wheels.sh --with-dali   # also DALI and its nvJPEG/nvImageCodec libraries
#
# Then follow the printed call list (also in wheels/manifest.json, "calls").
set -euo pipefail
cd "$(dirname "$0")/../.."
WITH_DALI=0
for arg in "$@"; do
  case "$arg" in
    --with-dali) WITH_DALI=1 ;;
    *) echo "unknown argument $arg (expected --with-dali)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DL=wheels-download
mkdir -p "$DL" wheels

# What the GPU image lacks, pinned (one version of each: two versions stop the install there).
CORE=(megatron-core==0.16.1
      transformer-engine==2.20.2 transformer-engine-cu13==2.20.2
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0 importlib-metadata==10.2.0 nvdlfw-inspect==0.2.2)
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
      nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
      astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0)
# TE's PyTorch extension has no wheel on the index; one prebuilt for the GPU image's torch/CUDA.
TE_TORCH_NAME=transformer_engine_torch-2.20.2-cp312-cp312-linux_x86_64.whl
TE_TORCH=${TE_TORCH_WHEEL:-}
if [ -z "$TE_TORCH" ]; then
  # the workspace keeps it in a gpu-wheels folder of its shared/ area, in or beside the checkout
  for dir in shared/gpu-wheels "$(dirname "$PWD")/shared/gpu-wheels"; do
    [ -f "$dir/$TE_TORCH_NAME" ] && TE_TORCH=$dir/$TE_TORCH_NAME && break
  done
fi
[ -f "${TE_TORCH:-/nonexistent}" ] || { echo "no $TE_TORCH_NAME found: set TE_TORCH_WHEEL=path" >&2; exit 1; }

download() {  # $1: folder, rest: requirements; cp312 manylinux x86_64 wheels only, no dependencies
  local dest=$1; shift
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "$@" 2>&1 | grep -v "is ignored: it is neither" || true
}

files_for() {  # requirement names -> the downloaded file names, comma-separated
  local out=() req name
  for req in "$@"; do
    name=$(echo "${req%%==*}" | tr '-' '_')
    local version=${req##*==}
    local match
    match=$(cd "$DL" && ls | grep -i "^${name}-${version}-.*\.whl$" | head -1)
    [ -n "$match" ] || { echo "download of $req failed (no ${name}-${version}-*.whl in $DL)" >&2; exit 1; }
    out+=("$match")
  done
  (IFS=,; echo "${out[*]}")
}

download "$DL" "${CORE[@]}"
cp "$TE_TORCH" "$DL/"
PACK_ARGS=(--group "core=$(files_for "${CORE[@]}"),$TE_TORCH_NAME")
if [ "$WITH_DALI" = 1 ]; then
  download "$DL" "${DALI[@]}"
  PACK_ARGS+=(--group "dali=$(files_for "${DALI[@]}")")
fi
"$PY" tools/gpu/carry.py pack --src "$DL" --out . --manifest-dir wheels "${PACK_ARGS[@]}"
du -sh parts* wheels | sed 's/^/  /'
