"""The coordinator's check of the signed ledger entry in each train reply: it reads the entry
and the node's signed ledger head from the reply and has the privacy core's
:class:`~fedtune.privacy.entry_check.EntryCheck` judge them. A reply whose entry fails is not
aggregated, and the reason is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import RecordDict
from sqlalchemy.engine import Engine

from fedtune.platform.wire.messages import ledger_from_content
from fedtune.privacy.entry_check import EntryCheck
from fedtune.privacy.ledger import (
    Checkpoint,
    LedgerEntry,
    LedgerFormatError,
)


@dataclass(frozen=True)
class SignedRound:
    entry: LedgerEntry
    checkpoint: Checkpoint


class LedgerCheck:
    """Verifies train replies' ledger entries against the enrolled node keys (the check
    itself is the privacy core's :class:`~fedtune.privacy.entry_check.EntryCheck`)."""

    def __init__(
        self,
        *,
        engine: Engine,
        run_id: str,
        enrolled: Mapping[str, Ed25519PublicKey],
        training_method: str | None = None,
    ):
        self.entries = EntryCheck(
            engine=engine, run_id=run_id, enrolled=enrolled, training_method=training_method
        )
        self.enrolled = self.entries.enrolled

    def __call__(
        self,
        server_round: int,
        node_name: str | None,
        content: RecordDict,
        *,
        kind: str = "training_round",
    ) -> tuple[SignedRound | None, str | None]:
        """The verified entry, or None and the reason it was refused. ``node_name`` is whose
        reply it is: in deployment the sender's enrolled name, never the name it reports;
        ``kind`` what the entry must record (``metric_release`` in an evaluate reply)."""
        if node_name is None or node_name not in self.enrolled:
            return None, f"node {node_name!r} is not enrolled: no public key to verify its ledger"
        try:
            entry, checkpoint = ledger_from_content(content)
        except LedgerFormatError as exc:
            return None, f"ledger entry refused: {exc}"
        reason = self.entries.problem(server_round, node_name, entry, checkpoint, kind=kind)
        if reason is not None:
            return None, f"ledger entry refused: {reason}"
        return SignedRound(entry, checkpoint), None
