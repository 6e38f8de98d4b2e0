"""`fedtune db`: the coordinator's database."""

from __future__ import annotations

import argparse
from typing import Any

from fedtune.cli.options import database_option


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    db = commands.add_parser("db", help="the coordinator's database").add_subparsers(
        title="db commands"
    )
    upgrade = db.add_parser(
        "upgrade", help="migrate the coordinator's database to the newest schema, keeping rows"
    )
    database_option(upgrade, long_name=True)
    upgrade.set_defaults(handler=_db_upgrade)


def _db_upgrade(args: argparse.Namespace) -> int:
    from fedtune.platform.db.db_admin import db_upgrade

    return db_upgrade(args.db)
