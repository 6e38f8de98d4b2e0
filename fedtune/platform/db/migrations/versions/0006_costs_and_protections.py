"""Costs and protections: each node reply's cost figures (``node_costs``), copies of the
coordinator's node-level DP ledger (``node_level_entries``, append-only) and the protections a
run started with (``runs.protections``). Older runs keep every row; their protections are
None (not recorded) and they have no costs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COSTS, NODE_LEVEL = "node_costs", "node_level_entries"


def upgrade() -> None:
    op.create_table(
        COSTS,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("node_name", sa.String(length=200), nullable=False),
        sa.Column("flower_node_id", sa.String(length=32), nullable=False),
        sa.Column("train_tokens", sa.BigInteger(), nullable=True),
        sa.Column("evaluate_tokens", sa.BigInteger(), nullable=True),
        sa.Column("train_device_seconds", sa.Float(), nullable=True),
        sa.Column("evaluate_device_seconds", sa.Float(), nullable=True),
        sa.Column("wall_seconds", sa.Float(), nullable=True),
        sa.Column("refused", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(f"ix_{COSTS}_run_id", COSTS, ["run_id"])
    op.create_table(
        NODE_LEVEL,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("epsilon_after", sa.Float(), nullable=True),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "seq"),
    )
    op.create_index(f"ix_{NODE_LEVEL}_run_id", NODE_LEVEL, ["run_id"])
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER IF NOT EXISTS {NODE_LEVEL}_no_{operation.lower()} "
                f"BEFORE {operation} ON {NODE_LEVEL} "
                f"BEGIN SELECT RAISE(ABORT, '{NODE_LEVEL} is append-only'); END"
            )
    elif bind.dialect.name == "postgresql":  # fedtune_append_only() comes from 0001
        op.execute(
            f"CREATE TRIGGER {NODE_LEVEL}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
            f"ON {NODE_LEVEL} FOR EACH STATEMENT EXECUTE FUNCTION fedtune_append_only()"
        )
    else:
        raise RuntimeError(f"no append-only triggers for the {bind.dialect.name} database")
    op.add_column("runs", sa.Column("protections", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Not a batch (which rebuilds the table, refused under SQLite's foreign keys while rounds
    # point at runs): SQLite drops a plain column in place since 3.35.
    op.execute("ALTER TABLE runs DROP COLUMN protections")
    op.drop_table(NODE_LEVEL)  # and its triggers
    op.drop_table(COSTS)
