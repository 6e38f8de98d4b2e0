"""The `fedtune` command: one module per command group, built with argparse.

argparse rather than typer (which Flower installs): the commands, options, help and exit codes
stay exactly as users and scripts know them, one error path serves every command, and nothing
is imported that `--help` does not need. Each group imports heavy libraries (torch,
transformers, Flower, SQLAlchemy, Streamlit) only in the handler that needs them, so
`fedtune --help` and the audit commands start fast (the audit's worker processes re-import
this package).
"""

from __future__ import annotations

import argparse
import sys

from fedtune.cli import (
    abtest,
    audit,
    certs,
    coordinator,
    dashboard,
    data,
    db,
    demo,
    model,
    node,
    privacy,
    run,
)
from fedtune.common.errors import FedtuneError

# In the order `fedtune --help` lists them.
GROUPS = (node, certs, coordinator, run, data, model, demo, abtest, dashboard, privacy, audit, db)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except FedtuneError as exc:
        return _fail(str(exc))
    except OSError as exc:
        # Backstop: the files a command reads are checked where they are read (a
        # FedtuneError naming the file); an OS refusal elsewhere (a folder without write
        # permission, a full disk) names its path in one line too. One without a path is a bug.
        if exc.filename is None:
            raise
        return _fail(f"{exc.filename}: {exc.strerror or exc}")


def _fail(message: str) -> int:
    """One line on stderr, exit code 2: a multi-line message is joined with '; '."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"fedtune: error: {line}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Federated, differentially private LoRA fine-tuning."
    )
    commands = parser.add_subparsers(title="commands")
    for group in GROUPS:
        group.register(commands)
    return parser
