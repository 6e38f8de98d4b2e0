"""`fedtune db upgrade`: bring the coordinator's database to the newest schema revision."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import make_url

from fedtune.common.database import DatabaseNotFoundError, database_url
from fedtune.platform.db.storage import current_revision, upgrade_database


def db_upgrade(db: str) -> int:
    """Migrate database ``db`` (a URL or a SQLite file, created if missing in an existing
    folder), print what was done; returns the exit code. A database made before migrations
    is adopted, rows kept."""
    url = database_url(db)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(str(parsed.database)).parent
        if not folder.is_dir():  # a typo in the path: make no folders and no empty database
            raise DatabaseNotFoundError(f"{db}: folder {folder} does not exist")
    try:
        before = current_revision(url)
    except DatabaseNotFoundError:
        before = None
    after = upgrade_database(url)
    shown = make_url(url).render_as_string(hide_password=True)
    if before == after:
        print(f"{shown}: already at {after} (newest)")
    else:
        print(f"{shown}: upgraded from {before or 'no revision'} to {after} (newest)")
    return 0
