#!/usr/bin/env bash
# Creates .venv from nothing: the pinned CPU torch first (so no dependency ever pulls a CUDA
# build), then megavlm in editable mode (builds csrc/ into megavlm._C) with its test extras.
# Re-running is cheap: the install is skipped while setup.py, pyproject.toml and csrc/ are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.megavlm-installed"
want=$(cat setup.py pyproject.toml csrc/* tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import megavlm._C" 2>/dev/null; then
  exit 0
fi
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "$TORCH_PIN"
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -c "from megavlm.console import filter_known_warnings; filter_known_warnings()
import torch, megatron.core, megavlm._C; print('megavlm env ready: torch', torch.__version__)"
echo "$want" > "$stamp"
