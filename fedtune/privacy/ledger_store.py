"""Where epsilon ledgers are kept: the node's own ledger and the coordinator's copies.

Four append-only tables (SQLAlchemy; SQLite or PostgreSQL): ``ledger_entries`` (each sealed
entry as its exact JSON, plus a few columns to query by), ``ledger_checkpoints`` (signed chain
heads), ``ledger_keys`` (the public key a node signs with) and ``ledger_receipts`` (the
coordinator's countersigned heads, :mod:`fedtune.privacy.receipts`). Database triggers refuse
UPDATE and DELETE on all four; the hash chain and the signatures detect what gets past them (a
file edited outside the database, a dropped trigger).

The coordinator's database gets these tables and triggers from its Alembic migrations
(``fedtune.platform.db.migrations``); a node's own ``ledger.db`` from :func:`create_ledger_tables`.
A change to the tables or triggers here needs a new migration too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import (
    DDL,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedtune.common.errors import FedtuneError
from fedtune.common.sqltypes import UTCDateTime
from fedtune.privacy.ledger import Checkpoint, LedgerEntry
from fedtune.privacy.receipts import Receipt


class LedgerBase(DeclarativeBase):
    pass


class LedgerEntryRow(LedgerBase):
    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("node", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(200), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    data_fingerprint: Mapped[str] = mapped_column(String(80), index=True)
    run_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    epsilon_after: Mapped[float | None] = mapped_column(Float)
    hash: Mapped[str] = mapped_column(String(64))
    entry: Mapped[str] = mapped_column(Text)  # the sealed entry's JSON, exactly as signed
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime, default=lambda: datetime.now(UTC))

    def sealed(self) -> LedgerEntry:
        return entry_from_json(self.entry)


class LedgerCheckpointRow(LedgerBase):
    __tablename__ = "ledger_checkpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(200), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    checkpoint: Mapped[str] = mapped_column(Text)  # the signed checkpoint's JSON

    def signed(self) -> Checkpoint:
        return Checkpoint.from_dict(json.loads(self.checkpoint))


class LedgerKeyRow(LedgerBase):
    __tablename__ = "ledger_keys"
    __table_args__ = (UniqueConstraint("node", "public_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(200), index=True)
    public_key: Mapped[str] = mapped_column(String(64))  # base64 of the raw Ed25519 key
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=lambda: datetime.now(UTC))


class LedgerReceiptRow(LedgerBase):
    __tablename__ = "ledger_receipts"
    __table_args__ = (UniqueConstraint("node", "seq", "witness"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(200), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    witness: Mapped[str] = mapped_column(String(64))  # base64 of the witness's Ed25519 key
    receipt: Mapped[str] = mapped_column(Text)  # the signed receipt's JSON

    def signed(self) -> Receipt:
        return Receipt.from_dict(json.loads(self.receipt))


_APPEND_ONLY_TABLES = ("ledger_entries", "ledger_checkpoints", "ledger_keys", "ledger_receipts")

for _table in _APPEND_ONLY_TABLES:
    for _operation in ("UPDATE", "DELETE"):
        event.listen(
            LedgerBase.metadata.tables[_table],
            "after_create",
            DDL(
                f"CREATE TRIGGER {_table}_no_{_operation.lower()} BEFORE {_operation} "
                f"ON {_table} BEGIN SELECT RAISE(ABORT, '{_table} is append-only'); END"
            ).execute_if(dialect="sqlite"),
        )
event.listen(  # before the tables: each table's trigger needs the function at once
    LedgerBase.metadata,
    "before_create",
    DDL(
        "CREATE OR REPLACE FUNCTION fedtune_append_only() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION '%% is append-only', TG_TABLE_NAME; END; $$ LANGUAGE plpgsql"
    ).execute_if(dialect="postgresql"),  # %%: DDL substitutes %(table)s and the like
)
for _table in _APPEND_ONLY_TABLES:
    event.listen(
        LedgerBase.metadata.tables[_table],
        "after_create",
        DDL(
            f"CREATE TRIGGER {_table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
            f"ON {_table} FOR EACH STATEMENT EXECUTE FUNCTION fedtune_append_only()"
        ).execute_if(dialect="postgresql"),
    )


class LedgerConflictError(FedtuneError, RuntimeError):
    """An entry that does not extend the stored chain (a second writer, or a replay)."""


def create_ledger_tables(engine: Engine) -> None:
    LedgerBase.metadata.create_all(engine)


def ledger_entries(
    session: Session, node: str, *, data_fingerprint: str | None = None
) -> list[LedgerEntry]:
    """``node``'s stored entries in order (only those of one data set, if given)."""
    query = select(LedgerEntryRow).where(LedgerEntryRow.node == node)
    if data_fingerprint is not None:
        query = query.where(LedgerEntryRow.data_fingerprint == data_fingerprint)
    return [row.sealed() for row in session.scalars(query.order_by(LedgerEntryRow.seq))]


def ledger_head(session: Session, node: str) -> LedgerEntryRow | None:
    """The stored entry of ``node`` with the highest seq."""
    return session.scalars(
        select(LedgerEntryRow)
        .where(LedgerEntryRow.node == node)
        .order_by(LedgerEntryRow.seq.desc())
        .limit(1)
    ).first()


def latest_checkpoint(session: Session, node: str) -> Checkpoint | None:
    row = session.scalars(
        select(LedgerCheckpointRow)
        .where(LedgerCheckpointRow.node == node)
        .order_by(LedgerCheckpointRow.seq.desc(), LedgerCheckpointRow.id.desc())
        .limit(1)
    ).first()
    return row.signed() if row is not None else None


def node_public_keys(session: Session, node: str) -> list[str]:
    rows = session.scalars(
        select(LedgerKeyRow).where(LedgerKeyRow.node == node).order_by(LedgerKeyRow.id)
    )
    return [row.public_key for row in rows]


def ledger_nodes(session: Session) -> list[str]:
    return sorted(session.scalars(select(LedgerEntryRow.node).distinct()))


def add_public_key(session: Session, node: str, public_key: str) -> None:
    if public_key not in node_public_keys(session, node):
        session.add(LedgerKeyRow(node=node, public_key=public_key))


def ledger_receipts(session: Session, node: str) -> list[Receipt]:
    """The receipts stored for ``node``'s ledger, by seq."""
    rows = session.scalars(
        select(LedgerReceiptRow)
        .where(LedgerReceiptRow.node == node)
        .order_by(LedgerReceiptRow.seq, LedgerReceiptRow.id)
    )
    return [row.signed() for row in rows]


def receipt_row(receipt: Receipt) -> LedgerReceiptRow:
    return LedgerReceiptRow(
        node=receipt.node, seq=receipt.seq, witness=receipt.witness, receipt=_json(receipt)
    )


def add_receipt(session: Session, receipt: Receipt) -> bool:
    """Store ``receipt`` unless one of the same witness for the same head is stored; whether
    it was added."""
    stored = session.scalars(
        select(LedgerReceiptRow.id).where(
            LedgerReceiptRow.node == receipt.node,
            LedgerReceiptRow.seq == receipt.seq,
            LedgerReceiptRow.witness == receipt.witness,
        )
    ).first()
    if stored is not None:
        return False
    session.add(receipt_row(receipt))
    return True


def entry_row(entry: LedgerEntry) -> LedgerEntryRow:
    return LedgerEntryRow(
        node=entry.node,
        seq=entry.seq,
        data_fingerprint=entry.data_fingerprint,
        run_id=entry.run_id,
        round=entry.round,
        epsilon_after=entry.epsilon_after,
        hash=entry.hash,
        entry=_json(entry),
    )


def checkpoint_row(checkpoint: Checkpoint) -> LedgerCheckpointRow:
    return LedgerCheckpointRow(
        node=checkpoint.node,
        seq=checkpoint.seq,
        checkpoint=_json(checkpoint),
    )


def append_entries(
    session: Session,
    entries: Sequence[LedgerEntry],
    checkpoint: Checkpoint,
    *,
    contiguous: bool,
) -> None:
    """Store ``entries`` and their head ``checkpoint``.

    ``contiguous`` (a node's own ledger): the first entry must extend the stored head. The
    coordinator keeps copies of what reached it, which may skip entries a node spent alone.
    """
    for entry in entries:
        head = ledger_head(session, entry.node)
        if head is not None and entry.seq <= head.seq:
            raise LedgerConflictError(
                f"ledger of {entry.node} already holds entry {entry.seq} (head is {head.seq})"
            )
        if contiguous:
            expected_seq, expected_hash = (head.seq + 1, head.hash) if head else (1, None)
            if entry.seq != expected_seq or (
                expected_hash is not None and entry.prev_hash != expected_hash
            ):
                raise LedgerConflictError(
                    f"entry {entry.seq} of {entry.node} does not extend the stored chain "
                    f"(expected entry {expected_seq})"
                )
        session.add(entry_row(entry))
        session.flush()
    session.add(checkpoint_row(checkpoint))


def entry_from_json(text: str) -> LedgerEntry:
    return LedgerEntry.from_dict(json.loads(text))


def _json(value: LedgerEntry | Checkpoint | Receipt) -> str:
    return json.dumps(value.to_dict(), sort_keys=True)
