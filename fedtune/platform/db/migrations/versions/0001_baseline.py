"""Baseline: every table of the coordinator's database, and the ledger's append-only triggers.

Also adopts a database made before migrations (by ``create_all``, at any earlier state): only
what is missing is created, nullable columns missing from existing tables are added (e.g.
``epsilon_reports.epsilon_cap``), and every row stays.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The schema as of this revision, frozen here: later model changes need their own revision.
metadata = sa.MetaData()
when = sa.DateTime(timezone=True)


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _run_id() -> sa.Column[str]:
    return sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id"), nullable=False, index=True)


sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("flower_run_id", sa.String(32), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("rounds_planned", sa.Integer(), nullable=False),
    sa.Column("base_model_spec", sa.Text(), nullable=False),
    sa.Column("base_model_fingerprint", sa.String(80), nullable=False),
    sa.Column("config", sa.JSON(), nullable=False),
    sa.Column("started_at", when, nullable=False),
    sa.Column("finished_at", when, nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
)
sa.Table(
    "rounds",
    metadata,
    _id(),
    _run_id(),
    sa.Column("number", sa.Integer(), nullable=False),
    sa.Column("nodes_sampled", sa.Integer(), nullable=False),
    sa.Column("updates_accepted", sa.Integer(), nullable=False),
    sa.Column("updates_rejected", sa.Integer(), nullable=False),
    sa.Column("train_loss", sa.Float(), nullable=True),
    sa.Column("held_out_loss", sa.Float(), nullable=True),
    sa.Column("seconds", sa.Float(), nullable=True),
    sa.Column("finished_at", when, nullable=False),
    sa.UniqueConstraint("run_id", "number"),
)
sa.Table(
    "node_metrics",
    metadata,
    _id(),
    _run_id(),
    sa.Column("round", sa.Integer(), nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("node_name", sa.String(200), nullable=False),
    sa.Column("flower_node_id", sa.String(32), nullable=False),
    sa.Column("num_examples", sa.Integer(), nullable=False),
    sa.Column("metrics", sa.JSON(), nullable=False),
)
sa.Table(
    "epsilon_reports",
    metadata,
    _id(),
    _run_id(),
    sa.Column("round", sa.Integer(), nullable=False),
    sa.Column("node_name", sa.String(200), nullable=False),
    sa.Column("data_fingerprint", sa.String(80), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("epsilon", sa.Float(), nullable=True),
    sa.Column("epsilon_round", sa.Float(), nullable=True),
    sa.Column("delta", sa.Float(), nullable=True),
    sa.Column("noise_multiplier", sa.Float(), nullable=True),
    sa.Column("sample_rate", sa.Float(), nullable=False),
    sa.Column("max_grad_norm", sa.Float(), nullable=True),
    sa.Column("steps", sa.Integer(), nullable=False),
    sa.Column("accountant", sa.String(80), nullable=True),
    sa.Column("epsilon_cap", sa.Float(), nullable=True),  # missing from older databases
)
sa.Table(
    "adapter_checkpoints",
    metadata,
    _id(),
    _run_id(),
    sa.Column("round", sa.Integer(), nullable=False),
    sa.Column("path", sa.Text(), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", when, nullable=False),
    sa.UniqueConstraint("run_id", "round"),
)
sa.Table(
    "rejected_updates",
    metadata,
    _id(),
    _run_id(),
    sa.Column("round", sa.Integer(), nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("node_name", sa.String(200), nullable=True),
    sa.Column("flower_node_id", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("created_at", when, nullable=False),
)
sa.Table(
    "model_promotions",
    metadata,
    _id(),
    sa.Column("version", sa.String(120), nullable=False),
    sa.Column("adapter_sha256", sa.String(64), nullable=True),
    sa.Column("promoted_by", sa.String(200), nullable=False),
    sa.Column("note", sa.Text(), nullable=True),
    sa.Column("promoted_at", when, nullable=False),
)
sa.Table(
    "ab_tests",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("version_a", sa.String(120), nullable=False),
    sa.Column("version_b", sa.String(120), nullable=False),
    sa.Column("metrics", sa.JSON(), nullable=False),
    sa.Column("alpha", sa.Float(), nullable=False),
    sa.Column("nodes", sa.JSON(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("started_at", when, nullable=False),
    sa.Column("finished_at", when, nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
)
sa.Table(
    "ab_test_results",
    metadata,
    _id(),
    sa.Column("test_id", sa.String(64), sa.ForeignKey("ab_tests.id"), nullable=False, index=True),
    sa.Column("scope", sa.String(200), nullable=False),
    sa.Column("metric", sa.String(40), nullable=False),
    sa.Column("higher_is_better", sa.Boolean(), nullable=False),
    sa.Column("examples", sa.Integer(), nullable=False),
    sa.Column("mean_a", sa.Float(), nullable=True),
    sa.Column("mean_b", sa.Float(), nullable=True),
    sa.Column("difference", sa.Float(), nullable=True),
    sa.Column("ci_low", sa.Float(), nullable=True),
    sa.Column("ci_high", sa.Float(), nullable=True),
    sa.Column("confidence", sa.Float(), nullable=False),
    sa.Column("test", sa.String(80), nullable=False),
    sa.Column("p_value", sa.Float(), nullable=True),
    sa.Column("p_adjusted", sa.Float(), nullable=True),
    sa.Column("verdict", sa.String(40), nullable=False),
    sa.Column("detail", sa.JSON(), nullable=False),
)
sa.Table(
    "health_signals",
    metadata,
    _id(),
    _run_id(),
    sa.Column("round", sa.Integer(), nullable=False),
    sa.Column("node_name", sa.String(200), nullable=True),
    sa.Column("signal", sa.String(40), nullable=False),
    sa.Column("value", sa.Float(), nullable=True),
    sa.Column("unavailable", sa.Text(), nullable=True),
)
sa.Table(
    "health_alerts",
    metadata,
    _id(),
    _run_id(),
    sa.Column("round", sa.Integer(), nullable=False),
    sa.Column("node_name", sa.String(200), nullable=True),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("created_at", when, nullable=False),
)
sa.Table(
    "ledger_entries",
    metadata,
    _id(),
    sa.Column("node", sa.String(200), nullable=False, index=True),
    sa.Column("seq", sa.Integer(), nullable=False),
    sa.Column("data_fingerprint", sa.String(80), nullable=False, index=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("round", sa.Integer(), nullable=False),
    sa.Column("epsilon_after", sa.Float(), nullable=True),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("entry", sa.Text(), nullable=False),
    sa.Column("stored_at", when, nullable=False),
    sa.UniqueConstraint("node", "seq"),
)
sa.Table(
    "ledger_checkpoints",
    metadata,
    _id(),
    sa.Column("node", sa.String(200), nullable=False, index=True),
    sa.Column("seq", sa.Integer(), nullable=False),
    sa.Column("checkpoint", sa.Text(), nullable=False),
)
sa.Table(
    "ledger_keys",
    metadata,
    _id(),
    sa.Column("node", sa.String(200), nullable=False, index=True),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("added_at", when, nullable=False),
    sa.UniqueConstraint("node", "public_key"),
)

APPEND_ONLY_TABLES = ("ledger_entries", "ledger_checkpoints", "ledger_keys")


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    for table in metadata.sorted_tables:
        if table.name not in existing:
            table.create(bind)  # with its indexes
            continue
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in columns:
                continue
            if not column.nullable:
                raise RuntimeError(
                    f"table {table.name} lacks column {column.name}, which cannot be added to "
                    "existing rows (NOT NULL, no default)"
                )
            op.add_column(table.name, sa.Column(column.name, column.type, nullable=True))
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(bind)
    _create_append_only_triggers(bind.dialect.name)


def downgrade() -> None:
    for table in reversed(metadata.sorted_tables):
        op.drop_table(table.name)  # and its triggers
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS fedtune_append_only()")


def _create_append_only_triggers(dialect: str) -> None:
    """The triggers ``ledger_store`` creates with its tables, under the same names (a
    database made before migrations has them already)."""
    if dialect == "sqlite":
        for table in APPEND_ONLY_TABLES:
            for operation in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{operation.lower()} "
                    f"BEFORE {operation} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
    elif dialect == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION fedtune_append_only() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END; $$ LANGUAGE plpgsql"
        )
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION fedtune_append_only()"
            )
    else:
        raise RuntimeError(f"no append-only ledger triggers for the {dialect} database")
