"""Each enrolled node's enrollment certificate (signed by the consortium's CA), which the
ServerApp relays with the node's signed SecAgg+ keys to its peers.

Rows enrolled before have none: their nodes' peers refuse secure rounds with them until the
node is enrolled again with a certified enrollment (`fedtune certs certify-node`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "enrolled_nodes"
COLUMN = "certificate"


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(TABLE)}
    if COLUMN in columns:
        return
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column(COLUMN, sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column(COLUMN)
