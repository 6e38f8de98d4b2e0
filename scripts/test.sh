#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the whole test suite.
#   bash scripts/test.sh [--fast] [PYTEST ARGS...]
# --fast: leave out the end-to-end (real processes, browser), simulation (Ray) and
# integration (real model) tiers and run the rest in parallel: the loop for development. CI
# runs everything, one test at a time (the slow tiers time real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [ "${1:-}" = "--fast" ]; then
    shift
    # one pytest worker per core (pytest-xdist): 137 s instead of 217 s on 2 cores
    tier=(-m "not e2e and not simulation and not integration" -n auto)
fi
bash scripts/setup.sh
bash scripts/system-deps.sh
.venv/bin/ruff check fedtune tests benchmarks tools
.venv/bin/ruff format --check fedtune tests benchmarks tools
.venv/bin/mypy
# Container files (tests/test_docker_files.py checks them too, and runs the entrypoints)
.venv/bin/hadolint --failure-threshold warning docker/Dockerfile
.venv/bin/shellcheck --external-sources docker/*.sh
.venv/bin/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml \
    docker/compose.gpu.yaml
# The storage tests run on SQLite and on a throwaway PostgreSQL (unless one is given), in a
# folder of this run's own: a shared one would be stopped by another run's exit.
if [ -z "${FEDTUNE_TEST_POSTGRES_URL:-}" ]; then
    postgres_dir=$(mktemp -d /tmp/fedtune-postgres.XXXXXX)
    trap 'bash scripts/postgres-for-tests.sh stop "$postgres_dir"' EXIT
    FEDTUNE_TEST_POSTGRES_URL=$(bash scripts/postgres-for-tests.sh start "$postgres_dir")
    export FEDTUNE_TEST_POSTGRES_URL
fi
# Exit code 5 (no tests collected) must fail, and does: set -e stops on any non-zero code.
.venv/bin/python -m pytest "${tier[@]}" "$@"
