#!/usr/bin/env bash
# Create .venv and install fedtune with its development tools, idempotently.
# torch is pinned to the CPU build (2.13.0) in the CPU set-up path: asking pip for a newer
# torch pulls several GB of CUDA packages. Set FEDTUNE_TORCH to override (e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FEDTUNE_TORCH:-torch==2.13.0}
EXTRAS=${FEDTUNE_EXTRAS:-dev}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "fedtune needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.fedtune-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]" "$TORCH_SPEC"
    echo "$want" > "$stamp"
fi
