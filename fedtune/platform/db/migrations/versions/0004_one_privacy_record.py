"""One privacy record: a round's epsilon is the signed ledger entry the coordinator keeps a
copy of (``ledger_entries``), no longer also an unsigned ``epsilon_reports`` row.

Nothing stored is lost: ``epsilon_reports`` becomes ``unsigned_epsilon_reports`` with every
row, read only for rounds that have no signed copy (rounds from before the ledger, or whose
entry the coordinator refused) and shown as unsigned. New rounds add no rows to it. A
downgrade renames it back and adds a row for each signed copy of a round it lacks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD, NEW = "epsilon_reports", "unsigned_epsilon_reports"


def upgrade() -> None:
    op.drop_index(f"ix_{OLD}_run_id", table_name=OLD)
    op.rename_table(OLD, NEW)
    op.create_index(f"ix_{NEW}_run_id", NEW, ["run_id"])


def downgrade() -> None:
    op.drop_index(f"ix_{NEW}_run_id", table_name=NEW)
    op.rename_table(NEW, OLD)
    op.create_index(f"ix_{OLD}_run_id", OLD, ["run_id"])
    bind = op.get_bind()
    have = set(bind.execute(sa.text(f"SELECT node_name, run_id, round FROM {OLD}")).tuples())
    runs = set(bind.execute(sa.text("SELECT id FROM runs")).scalars())
    table = sa.table(
        OLD,
        *(
            sa.column(name)
            for name in (
                "run_id",
                "round",
                "node_name",
                "data_fingerprint",
                "mode",
                "epsilon",
                "epsilon_round",
                "delta",
                "noise_multiplier",
                "sample_rate",
                "max_grad_norm",
                "steps",
                "accountant",
                "epsilon_cap",
            )
        ),
    )
    rows = []
    for (text,) in bind.execute(sa.text("SELECT entry FROM ledger_entries ORDER BY id")):
        entry = json.loads(text)
        key = (entry["node"], entry["run_id"], entry["round"])
        if key in have or entry["run_id"] not in runs:
            continue
        have.add(key)
        rows.append(
            {
                "run_id": entry["run_id"],
                "round": entry["round"],
                "node_name": entry["node"],
                "data_fingerprint": entry["data_fingerprint"],
                "mode": entry["mode"],
                "epsilon": entry["epsilon_after"],
                "epsilon_round": entry["epsilon_round"],
                "delta": entry["delta"],
                "noise_multiplier": entry["noise_multiplier"],
                "sample_rate": entry["sample_rate"]
                if entry["sample_rate"] is not None
                else math.nan,
                "max_grad_norm": entry["max_grad_norm"],
                "steps": entry["steps"],
                "accountant": entry["accountant"],
                "epsilon_cap": entry["epsilon_cap"],
            }
        )
    if rows:
        op.bulk_insert(table, rows)
