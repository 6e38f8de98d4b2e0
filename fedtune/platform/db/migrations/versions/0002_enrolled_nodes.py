"""The enrolled roster: each node's name, SuperNode key (as Flower reports it) and node id.

The table is created only when missing: a database made by ``create_all`` with today's models
(how the migration tests imitate an old database) has it already.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "enrolled_nodes"


def upgrade() -> None:
    if TABLE in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("auth_public_key", sa.String(length=400), nullable=False),
        sa.Column("flower_node_id", sa.String(length=32), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("auth_public_key"),
        sa.UniqueConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table(TABLE)
