"""Read-only access to the coordinator's database.

A SQLite file is opened as ``file:PATH?mode=ro`` (SQLite itself refuses every write) with
``PRAGMA query_only`` on top; any other database gets read-only sessions
(``SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY``) on every connection.

The dashboard reads the schema through fedtune's SQLAlchemy models alone, so the database must
be at this fedtune's newest migration: an older one is refused with the command that upgrades
it (the dashboard never changes the database), a newer one with "upgrade fedtune".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fedtune.common.database import database_url
from fedtune.common.errors import FedtuneError
from fedtune.platform.db.migrations import (
    DatabaseBehindError,
    DatabaseVersionError,
    check_current,
)


class DashboardError(FedtuneError, ValueError):
    """The dashboard cannot open the database as asked (missing file, not fedtune's, ...)."""


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = str(parsed.database)
    if database.startswith("file:"):  # already a SQLite URI filename
        database = database.removeprefix("file:").split("?", 1)[0]
    return Path(database).expanduser()


def read_only_url(url: str) -> URL:
    """``url`` changed so that the database refuses writes (SQLite: ``mode=ro``)."""
    parsed = _parse(url)
    path = sqlite_path(url)
    if path is None:
        return parsed
    return parsed.set(
        database=f"file:{quote(str(path.resolve()))}?mode=ro",
        query={**parsed.query, "uri": "true"},
    )


def open_read_only(url: str) -> Engine:
    """An engine on ``url`` through which no write can succeed."""
    target = read_only_url(database_url(url))
    engine = create_engine(target)
    if target.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_query_only)
    else:
        event.listen(engine, "connect", _session_read_only)
    return engine


def check_database(url: str) -> None:
    """Raise :class:`DashboardError` with a plain message unless ``url`` is a readable fedtune
    coordinator database."""
    url = database_url(url)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise DashboardError(f"no such database file: {path}")
    try:
        engine = open_read_only(url)
    except (ArgumentError, SQLAlchemyError, ImportError) as error:
        raise DashboardError(f"cannot open database {describe_database(url)}: {error}") from None
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("runs"):
                raise DashboardError(
                    f"{describe_database(url)} is not a fedtune coordinator database: it has "
                    "no runs table (start a run with `fedtune coordinator start` or "
                    "`fedtune demo` to create one)"
                )
            check_current(connection, url)
    except (DatabaseBehindError, DatabaseVersionError) as error:
        raise DashboardError(str(error)) from None
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip()
        raise DashboardError(f"cannot read database {describe_database(url)}: {reason}") from None
    finally:
        engine.dispose()


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise DashboardError(f"not a database URL or file path: {url!r}") from None


def describe_database(url: str) -> str:
    """``url`` for a message: a file's path, or the URL with its password hidden."""
    path = sqlite_path(url)
    return str(path) if path is not None else make_url(url).render_as_string(hide_password=True)


def _sqlite_query_only(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA query_only = ON")
    cursor.close()


def _session_read_only(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    cursor.close()
    connection.commit()
