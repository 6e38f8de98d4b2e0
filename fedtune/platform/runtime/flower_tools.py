"""Flower's commands (flower-superlink, flower-supernode, flwr) as installed beside this
Python. Flower starts some of its own commands by name (SuperExec, ClientApp, ServerApp), so
the processes fedtune starts get that folder first on their PATH."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fedtune.common.errors import FedtuneError


class FlowerNotInstalledError(FedtuneError, RuntimeError):
    """A Flower command is missing."""


def flower_command(name: str) -> str:
    """The path of Flower's command ``name`` (the venv's bin folder first)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FlowerNotInstalledError(f"{name} is not installed (pip install 'flwr[simulation]')")
    return found


def tool_path_environment() -> dict[str, str]:
    """This environment with the Flower commands' folder first on PATH."""
    folder = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([folder, os.environ.get("PATH", "")])}
