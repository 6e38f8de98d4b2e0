"""`fedtune audit export`: a node's ledger from a database into a ledger file for the auditor.

It reads either a node's own ledger database (``STATE_DIR/ledger.db``) or the coordinator's
(which holds the copies that reached it); both have the same ledger tables, and only those are
read. The coordinator's receipts go with the entries: those the node received, or those the
coordinator signed.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.common.database import connect, database_url, transaction
from fedtune.common.errors import FedtuneError
from fedtune.privacy.ledger_file import write_ledger_file
from fedtune.privacy.ledger_store import (
    latest_checkpoint,
    ledger_entries,
    ledger_nodes,
    ledger_receipts,
    node_public_keys,
)


class AuditError(FedtuneError, ValueError):
    """The export cannot be made as asked."""


def export_ledger(db: str, *, node: str, out: Path) -> int:
    """Write ``node``'s ledger from database ``db`` to ``out``; returns the entry count."""
    engine = connect(database_url(db, must_exist=True))
    with transaction(engine) as session:
        entries = ledger_entries(session, node)
        checkpoint = latest_checkpoint(session, node)
        keys = node_public_keys(session, node)
        known = ledger_nodes(session)
        receipts = ledger_receipts(session, node)
    if not entries:
        raise AuditError(
            f"no ledger entries for node {node!r} in {db}"
            + (f" (nodes there: {', '.join(known)})" if known else "")
        )
    if checkpoint is None or not keys:
        raise AuditError(f"{db} holds no signed ledger head or no public key for {node!r}")
    write_ledger_file(
        out,
        node=node,
        public_key=keys[-1],
        entries=entries,
        checkpoint=checkpoint,
        receipts=receipts,
    )
    return len(entries)
