#!/usr/bin/env bash
# Sets up medidiff with its test extras, lints it and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check medidiff tests benchmarks scripts
.venv/bin/lint-imports  # the layers of ARCHITECTURE.md (contracts in .importlinter)
.venv/bin/python -m pytest -q "$@"
