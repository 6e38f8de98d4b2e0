"""The coordinator's check of the signed ledger entry in each train reply.

A node sends, with its update, the ledger entry of the round it just trained and its signed
ledger head. The coordinator accepts the pair only when it is for this run and round, signed
by the key enrolled for that node, internally consistent (content matches its hash, the
checkpoint covers the entry), and extends (or at least does not contradict) the copy of that
node's ledger the coordinator already holds. A reply whose entry fails is not aggregated, and
the reason is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import RecordDict
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.platform.wire.messages import ledger_from_content
from fedtune.privacy.ledger import (
    CONTENT_REASON,
    SIGNATURE_REASON,
    Checkpoint,
    LedgerEntry,
    LedgerFormatError,
)
from fedtune.privacy.ledger_store import ledger_head
from fedtune.privacy.signing import verify_signature


@dataclass(frozen=True)
class SignedRound:
    entry: LedgerEntry
    checkpoint: Checkpoint


class LedgerCheck:
    """Verifies train replies' ledger entries against the enrolled node keys."""

    def __init__(self, *, engine: Engine, run_id: str, enrolled: Mapping[str, Ed25519PublicKey]):
        self.engine = engine
        self.run_id = run_id
        self.enrolled = dict(enrolled)

    def __call__(
        self, server_round: int, node_name: str | None, content: RecordDict
    ) -> tuple[SignedRound | None, str | None]:
        """The verified entry, or None and the reason it was refused. ``node_name`` is whose
        reply it is: in deployment the sender's enrolled name, never the name it reports."""
        if node_name is None or node_name not in self.enrolled:
            return None, f"node {node_name!r} is not enrolled: no public key to verify its ledger"
        try:
            entry, checkpoint = ledger_from_content(content)
        except LedgerFormatError as exc:
            return None, f"ledger entry refused: {exc}"
        reason = self._problem(server_round, node_name, entry, checkpoint)
        if reason is not None:
            return None, f"ledger entry refused: {reason}"
        return SignedRound(entry, checkpoint), None

    def _problem(
        self,
        server_round: int,
        node_name: str,
        entry: LedgerEntry,
        checkpoint: Checkpoint,
    ) -> str | None:
        key = self.enrolled[node_name]
        if entry.node != node_name or checkpoint.node != node_name:
            return f"it belongs to node {entry.node!r}, not {node_name!r}"
        if (entry.run_id, entry.round) != (self.run_id, server_round):
            return (
                f"it records run {entry.run_id} round {entry.round}, not run {self.run_id} "
                f"round {server_round}"
            )
        if not entry.content_matches():
            return CONTENT_REASON
        if not verify_signature(key, signature=entry.signature, message=bytes.fromhex(entry.hash)):
            return SIGNATURE_REASON
        if (checkpoint.seq, checkpoint.head_hash) != (entry.seq, entry.hash):
            return "the signed ledger head does not cover this entry"
        if not verify_signature(
            key, signature=checkpoint.signature, message=checkpoint.signed_message()
        ):
            return "the ledger head's signature does not match the enrolled key"
        return self._continuity_problem(entry)

    def _continuity_problem(self, entry: LedgerEntry) -> str | None:
        with transaction(self.engine) as session:
            head = ledger_head(session, entry.node)
        if head is None:
            return None
        if entry.seq <= head.seq:
            return (
                f"entry {entry.seq} does not come after entry {head.seq}, which the "
                "coordinator already holds (a replayed or forked ledger)"
            )
        if entry.seq == head.seq + 1 and entry.prev_hash != head.hash:
            return f"entry {entry.seq} does not chain to entry {head.seq} held here"
        return None
