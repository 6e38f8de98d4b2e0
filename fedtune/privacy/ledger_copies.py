"""The coordinator's copy of a node's epsilon ledger: read it, and say whether it verifies.

A copy verifies when its chain is intact, every entry's signature is valid under the node's
public key stored in the database (the latest one when there are several), and the node's
signed checkpoint covers its last entry. A copy may lack entries the node spent without this
coordinator (``fedtune node train``); when gaps are the only problem it is ``incomplete``,
not ``fails``: the entries it holds are authentic, and the node's own ledger closes the gaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from fedtune.common.database import transaction
from fedtune.privacy.ledger import (
    GENESIS_HASH,
    Checkpoint,
    LedgerEntry,
    LedgerFormatError,
    verify_chain,
)
from fedtune.privacy.ledger_store import (
    LedgerEntryRow,
    entry_from_json,
    latest_checkpoint,
    node_public_keys,
)
from fedtune.privacy.signing import load_public_key, verify_signature

Verdict = Literal["verifies", "fails", "incomplete", "unverifiable", "empty"]


@dataclass(frozen=True)
class CopyCheck:
    """The verdict on one node's ledger copy, with a sentence that explains it."""

    node: str
    entries: int
    keys: int
    verdict: Verdict
    message: str
    seq: int | None = None  # the first bad entry, when one is to blame

    @property
    def ok(self) -> bool:
        return self.verdict == "verifies"


@dataclass(frozen=True)
class LedgerCopy:
    entries: list[LedgerEntry]
    checkpoint: Checkpoint | None
    keys: list[str]


def read_copy(engine: Engine, node: str) -> LedgerCopy:
    with transaction(engine) as session:
        return LedgerCopy(
            entries=_entries(session, node),
            checkpoint=latest_checkpoint(session, node),
            keys=node_public_keys(session, node),
        )


def _entries(session: Session, node: str) -> list[LedgerEntry]:
    """``node``'s entries in seq order, as :func:`~fedtune.privacy.ledger_store.ledger_entries`
    reads them, without building an ORM object per row (twice as fast on a long copy)."""
    texts = session.scalars(
        select(LedgerEntryRow.entry).where(LedgerEntryRow.node == node).order_by(LedgerEntryRow.seq)
    )
    return [entry_from_json(text) for text in texts]


def check_copy(engine: Engine, node: str) -> CopyCheck:
    """Verify ``node``'s ledger copy against the node's public key stored in the database."""
    try:
        copy = read_copy(engine, node)
    except LedgerFormatError as error:
        return CopyCheck(node, 0, 0, "fails", f"a stored entry is malformed: {error}", error.seq)
    count, keys = len(copy.entries), len(copy.keys)
    if not copy.entries:
        return CopyCheck(node, 0, keys, "empty", "no ledger entries have reached the coordinator")
    if not copy.keys:
        return CopyCheck(node, count, 0, "unverifiable", "no public key is stored for this node")
    try:
        key = load_public_key(copy.keys[-1])
    except ValueError as error:
        return CopyCheck(node, count, keys, "unverifiable", f"its stored public key: {error}")
    result = verify_chain(copy.entries, public_key=key, checkpoint=copy.checkpoint)
    which = "the node's key" if keys == 1 else f"the latest of the node's {keys} keys"
    if result.ok:
        return CopyCheck(
            node,
            count,
            keys,
            "verifies",
            f"{count} {'entry' if count == 1 else 'entries'}: chain intact, every signature "
            f"valid under {which}, head signed",
        )
    gaps = _gaps_only(copy.entries, key, copy.checkpoint)
    if gaps:
        return CopyCheck(
            node,
            count,
            keys,
            "incomplete",
            f"{count} entries, each signed and chained where consecutive, but seq "
            f"{_ranges(gaps)} never reached the coordinator (rounds the node trained alone) or "
            "were deleted here: verify the node's own ledger to close the gaps",
        )
    assert result.problem is not None
    return CopyCheck(
        node,
        count,
        keys,
        "fails",
        f"{result.problem} (checked against {which})",
        result.problem.seq,
    )


def _gaps_only(
    entries: list[LedgerEntry], key: Ed25519PublicKey, checkpoint: Checkpoint | None
) -> list[tuple[int, int]]:
    """The missing seq ranges when missing entries are the copy's only problem, else []."""
    gaps: list[tuple[int, int]] = []
    previous: LedgerEntry | None = None
    for entry in entries:
        expected = 1 if previous is None else previous.seq + 1
        if entry.seq < expected or (previous is not None and entry.node != previous.node):
            return []
        if entry.seq > expected:
            gaps.append((expected, entry.seq - 1))
        elif entry.prev_hash != (GENESIS_HASH if previous is None else previous.hash):
            return []
        signed = verify_signature(key, signature=entry.signature, message=bytes.fromhex(entry.hash))
        if not entry.content_matches() or not signed:
            return []
        previous = entry
    head = entries[-1]
    if (
        checkpoint is None
        or (checkpoint.seq, checkpoint.head_hash) != (head.seq, head.hash)
        or not verify_signature(
            key, signature=checkpoint.signature, message=checkpoint.signed_message()
        )
    ):
        return []
    return gaps


def _ranges(gaps: list[tuple[int, int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in gaps)
