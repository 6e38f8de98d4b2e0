#!/usr/bin/env bash
# Set up (if needed), then run the demo: `fedtune demo` with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedtune demo "$@"
