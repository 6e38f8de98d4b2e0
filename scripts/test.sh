#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
.venv/bin/ruff check fedtune tests benchmarks
.venv/bin/ruff format --check fedtune tests benchmarks
.venv/bin/mypy
# Exit code 5 (no tests collected) must fail, and does: set -e stops on any non-zero code.
.venv/bin/python -m pytest "$@"
