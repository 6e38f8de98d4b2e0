"""`fedtune dashboard`: the coordinator's dashboard."""

from __future__ import annotations

import argparse
from typing import Any

from fedtune.cli.options import database_option


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    dashboard = commands.add_parser(
        "dashboard", help="the coordinator's dashboard (Streamlit, read-only on the database)"
    )
    database_option(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.set_defaults(handler=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    from fedtune.dashboard.launch import run_dashboard

    return run_dashboard(args.db, host=args.host, port=args.port)
