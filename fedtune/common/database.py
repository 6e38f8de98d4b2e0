"""Opening a database by URL or SQLite path, and one transaction per unit of work.

Shared by the coordinator's database (which adds its migrations on top) and the node's ledger
file (whose tables the privacy core creates itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from fedtune.common.errors import FedtuneError, unreadable


class DatabaseNotFoundError(FedtuneError, ValueError):
    """A SQLite database file that should exist does not."""


def database_url(value: str, *, must_exist: bool = False) -> str:
    """``value`` as an SQLAlchemy URL: a URL as given, a plain path as a SQLite file.

    ``must_exist``: refuse a SQLite file that is not there (SQLite would create it empty).
    """
    url = value if "://" in value else f"sqlite:///{Path(value).expanduser().resolve()}"
    if must_exist:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            path = Path(str(parsed.database)).expanduser()
            if not path.is_file():
                raise DatabaseNotFoundError(f"{value}: no such database file")
    return url


class NotADatabaseError(FedtuneError, ValueError):
    """A file given as a SQLite database is something else."""


_SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_file(path: Path) -> None:
    """Refuse a folder, or a file that is neither empty nor a SQLite database (SQLite would
    fail on it with a long SQL error, or on first write)."""
    if path.is_dir():
        raise NotADatabaseError(f"{path}: is a folder, not a SQLite database file")
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise NotADatabaseError(unreadable(path, exc)) from None
    if header and header != _SQLITE_HEADER:
        raise NotADatabaseError(f"{path}: not a SQLite database file")


def connect(url: str, *, pooled: bool = True) -> Engine:
    """An engine for ``url``, its schema left as it is; a SQLite file's folder is made if
    needed and a path that is a folder or not SQLite is refused; SQLite enforces foreign
    keys. ``pooled=False``: a connection per transaction, closed after it (no open file
    between uses)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _check_sqlite_file(Path(parsed.database))
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url) if pooled else create_engine(url, poolclass=NullPool)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_foreign_keys)
    return engine


def _sqlite_foreign_keys(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session whose writes commit together at the end, or not at all."""
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
