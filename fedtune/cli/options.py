"""Options several command groups share, defined once."""

from __future__ import annotations

import argparse
from pathlib import Path


def config_option(
    parser: argparse.ArgumentParser, kind: str, *, required: bool = True, help: str | None = None
) -> None:
    """``--config``: the command's TOML file (``kind``: node, run or coordinator)."""
    parser.add_argument("--config", required=required, type=Path, help=help or f"{kind} TOML file")


def coordinator_option(parser: argparse.ArgumentParser) -> None:
    """``--coordinator``: the coordinator.toml of the deployment a run command talks to."""
    parser.add_argument("--coordinator", required=True, type=Path, help="coordinator TOML")


def database_option(parser: argparse.ArgumentParser, *, long_name: bool = False) -> None:
    """``--db`` (and ``--database`` when ``long_name``): a database URL or SQLite file."""
    names = ("--database", "--db") if long_name else ("--db",)
    parser.add_argument(*names, dest="db", required=True, help="database URL or SQLite file")
