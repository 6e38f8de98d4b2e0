"""Alembic's command line on the coordinator's database, without an alembic.ini, e.g.

python -m fedtune.platform.db.migrations --database URL revision --autogenerate -m "add x"
python -m fedtune.platform.db.migrations --database URL history
"""

from __future__ import annotations

import argparse
import sys

from alembic.config import CommandLine

from fedtune.common.database import database_url
from fedtune.platform.db.migrations import alembic_config


def main(argv: list[str] | None = None) -> None:
    prog = "python -m fedtune.platform.db.migrations"
    ours = argparse.ArgumentParser(prog=prog, add_help=False)
    ours.add_argument("--database", required=True, help="database URL or SQLite file")
    known, rest = ours.parse_known_args(sys.argv[1:] if argv is None else argv)
    alembic = CommandLine(prog=f"{prog} --database URL")
    options = alembic.parser.parse_args(rest)
    if not hasattr(options, "cmd"):
        alembic.parser.error("too few arguments")
    alembic.run_cmd(alembic_config(database_url(known.database)), options)


if __name__ == "__main__":
    main()
