"""Read-only access to the coordinator's database.

A SQLite file is opened as ``file:PATH?mode=ro`` (SQLite itself refuses every write) with
``PRAGMA query_only`` on top; any other database gets read-only sessions
(``SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY``) on every connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fedtune.common.database import database_url
from fedtune.common.errors import FedtuneError

# Tables every fedtune coordinator database has had since its first version.
REQUIRED_TABLES = ("runs", "rounds")


class DashboardError(FedtuneError, ValueError):
    """The dashboard cannot open the database as asked (missing file, not fedtune's, ...)."""


@dataclass(frozen=True)
class Schema:
    """The tables (and their columns) a database holds: older databases lack newer ones."""

    columns: dict[str, frozenset[str]]

    def has(self, table: str, column: str | None = None) -> bool:
        if table not in self.columns:
            return False
        return column is None or column in self.columns[table]


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


def read_schema(engine: Engine) -> Schema:
    """The tables and columns of the database behind ``engine``."""
    inspector = inspect(engine)
    return Schema(
        {
            table: frozenset(column["name"] for column in inspector.get_columns(table))
            for table in inspector.get_table_names()
        }
    )


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
        schema = read_schema(engine)
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip()
        raise DashboardError(f"cannot read database {describe_database(url)}: {reason}") from None
    finally:
        engine.dispose()
    missing = [table for table in REQUIRED_TABLES if not schema.has(table)]
    if missing:
        raise DashboardError(
            f"{describe_database(url)} is not a fedtune coordinator database: it has no "
            f"{' or '.join(missing)} table (start a run with `fedtune coordinator start` or "
            "`fedtune demo` to create one)"
        )


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
