#!/usr/bin/env bash
# Downloads the cp312 wheels the GPU machine lacks into wheels/ (git-ignored), for `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d wheels "megatron-core==0.16.1"
ls -la wheels
