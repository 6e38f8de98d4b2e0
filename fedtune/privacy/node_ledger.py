"""The node's own epsilon ledger: what every data set has spent, signed and hash-chained.

It lives in ``STATE_DIR/ledger.db`` (SQLite, append-only by trigger) next to the node's
Ed25519 key ``STATE_DIR/node_key.pem``. It is the node's only record of privacy spending: the
accountant's history of a data set is replayed from its entries, so epsilon accumulates over
the node's whole life on that data set, across runs, base models and restarts, and never
resets. Appends take an exclusive file lock, so two processes of one node cannot fork the
chain. The coordinator keeps one too, for node-level DP (``OUTPUT_DIR/node-level-ledger``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from fedtune.common.database import connect, transaction
from fedtune.privacy.accounting import HistoryEntry
from fedtune.privacy.ledger import Checkpoint, LedgerEntry, seal_entry, sign_checkpoint
from fedtune.privacy.ledger_store import (
    LedgerEntryRow,
    add_public_key,
    add_receipt,
    append_entries,
    create_ledger_tables,
    ledger_entries,
    ledger_head,
)
from fedtune.privacy.receipts import Receipt
from fedtune.privacy.signing import KEY_FILE, NodeKey, public_key_from_text

LEDGER_FILE = "ledger.db"


def _stored_hash(session: Session, node: str, seq: int) -> str | None:
    return session.scalars(
        select(LedgerEntryRow.hash).where(LedgerEntryRow.node == node, LedgerEntryRow.seq == seq)
    ).first()


def node_key(state_dir: Path) -> NodeKey:
    """The node's signing key, created (mode 0600) on first use."""
    return NodeKey.load_or_create(state_dir / KEY_FILE)


def ledger_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / LEDGER_FILE}"


class NodeLedger:
    """The ledger of node ``node`` kept in ``state_dir``."""

    def __init__(self, state_dir: Path, *, node: str):
        self.state_dir = state_dir
        self.node = node
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one: the account's only
        self.key = node_key(state_dir)
        # Opened per use: a process that plays many nodes (a simulation's Ray actor) holds no
        # file of a node between its messages.
        self.engine: Engine = connect(ledger_url(state_dir), pooled=False)
        create_ledger_tables(self.engine)
        (state_dir / LEDGER_FILE).chmod(0o600)
        with transaction(self.engine) as session:
            add_public_key(session, node, self.key.public_key_text())

    def close(self) -> None:
        """Release the file's connections (the ledger opens them again if used)."""
        self.engine.dispose()

    def entries(self, data_fingerprint: str | None = None) -> list[LedgerEntry]:
        with transaction(self.engine) as session:
            return ledger_entries(session, self.node, data_fingerprint=data_fingerprint)

    def dp_history(self, data_fingerprint: str) -> list[HistoryEntry]:
        """The accountant history of the data set's private rounds, in order."""
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.entries(data_fingerprint)
            if e.mode == "dp" and e.noise_multiplier is not None
        ]

    def group_dp_history(self, data_fingerprints: Sequence[str]) -> list[HistoryEntry]:
        """The accountant history of the private rounds on any of ``data_fingerprints`` (data
        sets that hold the same people and so share one budget), in ledger order."""
        wanted = set(data_fingerprints)
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.entries()
            if e.data_fingerprint in wanted and e.mode == "dp" and e.noise_multiplier is not None
        ]

    def append(self, fields: Mapping[str, Any]) -> tuple[LedgerEntry, Checkpoint]:
        """Seal ``fields`` (every entry field but ``node``, ``seq`` and ``prev_hash``) as the
        next entry, sign the new head, store both; returns them."""
        with self._locked(), transaction(self.engine) as session:
            head_row = ledger_head(session, self.node)
            head = head_row.sealed() if head_row is not None else None
            entry = seal_entry({**fields, "node": self.node}, previous=head, key=self.key)
            checkpoint = sign_checkpoint(node=self.node, head=entry, key=self.key)
            append_entries(session, [entry], checkpoint, contiguous=True)
        return entry, checkpoint

    def keep_receipt(self, receipt: Receipt) -> str | None:
        """Store the coordinator's ``receipt`` for this ledger's head beside the entry it
        covers; the reason when it is refused (another node's, not a head this ledger holds,
        or not signed by the key it names). Storing one twice is a no-op."""
        if receipt.node != self.node:
            return f"the receipt is for node {receipt.node!r}, this node is {self.node!r}"
        witness = public_key_from_text(receipt.witness, source="the receipt's witness key")
        if not receipt.signed_by(witness):
            return f"the receipt for seq {receipt.seq} is not signed by the key it names"
        with self._locked(), transaction(self.engine) as session:
            if _stored_hash(session, self.node, receipt.seq) != receipt.head_hash:
                return (
                    f"the receipt covers seq {receipt.seq} with hash {receipt.head_hash[:12]}, "
                    "which this ledger does not hold"
                )
            add_receipt(session, receipt)
        return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(self.state_dir / ".ledger.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
