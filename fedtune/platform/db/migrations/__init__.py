"""Alembic migrations of the coordinator's database, run from inside the package.

There is no alembic.ini: :func:`alembic_config` builds the configuration in code with
``script_location`` pointing at this folder, so an installed wheel can migrate a database.
``python -m fedtune.platform.db.migrations --database URL ...`` is Alembic's own command line
(``revision --autogenerate -m ...``, ``history``, ``downgrade``...) on that configuration.

Revision 0001 is the schema as the old ``create_all`` code left it at its newest, and also
adopts a database made by that code at any earlier state (no ``alembic_version`` table): it
creates only the tables, indexes and triggers that are missing and adds missing nullable
columns (e.g. ``epsilon_reports.epsilon_cap``), keeping every row.
"""

from __future__ import annotations

import shlex
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import make_url
from sqlalchemy.engine import Connection

from fedtune.common.errors import FedtuneError

SCRIPT_LOCATION = str(Path(__file__).resolve().parent)


class DatabaseVersionError(FedtuneError, RuntimeError):
    """The database is at a revision this fedtune does not know: a newer fedtune made it."""


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration for the coordinator's database at ``url``."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser syntax
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _scripts().get_current_head()
    assert head is not None, "no migrations in " + SCRIPT_LOCATION
    return head


def database_revision(connection: Connection) -> str | None:
    """The revision recorded in the database (None: never migrated, or empty)."""
    return MigrationContext.configure(connection).get_current_revision()


class DatabaseBehindError(FedtuneError, RuntimeError):
    """The database is at an older revision than this fedtune's: `fedtune db upgrade` it."""


def _refuse_unknown(current: str, url: str) -> None:
    try:
        _scripts().get_revision(current)
    except CommandError:
        raise DatabaseVersionError(
            f"{_shown(url)}: the database is at revision {current!r}, which this fedtune "
            f"does not know (it knows up to {head_revision()!r}): it was made or upgraded by a "
            "newer fedtune; upgrade fedtune"
        ) from None


def check_current(connection: Connection, url: str) -> None:
    """Refuse, without changing anything, a database that is not at this fedtune's newest
    revision: :class:`DatabaseBehindError` (with the command that upgrades it) or
    :class:`DatabaseVersionError` (a newer fedtune's)."""
    current = database_revision(connection)
    if current == head_revision():
        return
    if current is not None:
        _refuse_unknown(current, url)
    at = "made before migrations" if current is None else f"at revision {current!r}"
    raise DatabaseBehindError(
        f"{_shown(url)} is {at}, behind this fedtune's {head_revision()!r}: run "
        f"`fedtune db upgrade --database {shlex.quote(_shown(url))}` first"
    )


def upgrade(connection: Connection, url: str) -> str:
    """Bring the database behind ``connection`` (``url``, for messages) to the newest
    revision; returns it. The caller commits."""
    current = database_revision(connection)
    head = head_revision()
    if current == head:
        return head
    if current is not None:
        _refuse_unknown(current, url)
    config = alembic_config(url)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return head


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
