#!/usr/bin/env bash
# Sets up medidiff in ./.venv. Usage: bash scripts/setup.sh [--test]
# Where no NVIDIA GPU is present, the CPU build of PyTorch is installed first, so that medidiff's own
# `torch` requirement is already satisfied and no multi-GB CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "torch>=2.2"
  else
    $PIP install -q "torch==2.13.0"
  fi
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test,bench]"
$PIP install -q -e ".${extras}"
