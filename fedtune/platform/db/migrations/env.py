"""Alembic's environment for the coordinator's database (see ``fedtune.platform.db.migrations``).

The caller's connection is used when there is one (``config.attributes["connection"]``: same
transaction, and an in-memory SQLite database stays the same database); otherwise the
configuration's ``sqlalchemy.url``.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator

from fedtune.platform.db.storage import Base
from fedtune.privacy.ledger_store import LedgerBase

TARGET_METADATA = [Base.metadata, LedgerBase.metadata]


def render_item(kind: str, item: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Our column types (e.g. UTCDateTime) as their plain SQLAlchemy type: a migration must
    not import the models, which change after it."""
    if kind == "type" and isinstance(item, TypeDecorator):
        return f"sa.{item.impl_instance!r}"
    return False


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=TARGET_METADATA,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch works on both
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: 0001 inspects the database")
given = context.config.attributes.get("connection")
if given is not None:
    run_migrations(given)
else:
    engine = create_engine(
        context.config.get_main_option("sqlalchemy.url", ""), poolclass=pool.NullPool
    )
    with engine.connect() as connection:
        run_migrations(connection)
