"""Budget groups: each node's stated group of data sets that share one budget
(``data.shares_budget_with``), per round it trained, with the group's epsilon as its guard
counted it. Older runs have no rows (their nodes stated no group).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GROUPS = "budget_groups"


def upgrade() -> None:
    op.create_table(
        GROUPS,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("node_name", sa.String(length=200), nullable=False),
        sa.Column("data_fingerprint", sa.String(length=80), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("epsilon_after", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(f"ix_{GROUPS}_run_id", GROUPS, ["run_id"])


def downgrade() -> None:
    op.drop_table(GROUPS)
