"""Whether a node's new ledger entry, as it reaches the coordinator, may be kept: it is for
this run and round, signed by the key enrolled for the node, internally consistent (content
matches its hash, the signed head covers the entry), records the run's training method (a
DPO run's round cannot pass for SFT's: the privacy unit would be misstated) and extends — or
at least does not contradict — the copy of the node's ledger the coordinator already holds."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.privacy.ledger import (
    CONTENT_REASON,
    ENTRY_FORMAT,
    SIGNATURE_REASON,
    Checkpoint,
    LedgerEntry,
    training_round_methods,
)
from fedtune.privacy.ledger_store import ledger_head
from fedtune.privacy.signing import verify_signature


class EntryCheck:
    """Checks new entries of run ``run_id`` against the ``enrolled`` keys and the copies
    stored in ``engine``'s ledger tables. ``training_method``: the run's (``sft``, ``dpo``,
    ``grpo``), which its training rounds must record; None: not a training run (A/B tests)."""

    def __init__(
        self,
        *,
        engine: Engine,
        run_id: str,
        enrolled: Mapping[str, Ed25519PublicKey],
        training_method: str | None = None,
    ):
        self.engine = engine
        self.run_id = run_id
        self.enrolled = dict(enrolled)
        self.training_method = training_method
        self.methods = None if training_method is None else training_round_methods(training_method)

    def problem(
        self,
        server_round: int,
        node_name: str,
        entry: LedgerEntry,
        checkpoint: Checkpoint,
        *,
        kind: str = "training_round",
    ) -> str | None:
        """Why ``entry`` of ``node_name`` (an enrolled name) cannot be kept; None: it can.
        ``kind`` is what the reply it came in records (a train reply: a training round; an
        evaluate reply: a metric release), so one cannot pass for the other."""
        key = self.enrolled[node_name]
        if entry.node != node_name or checkpoint.node != node_name:
            return f"it belongs to node {entry.node!r}, not {node_name!r}"
        if entry.entry_kind != kind:
            return f"it records a {entry.entry_kind}, and this reply a {kind}"
        if (entry.run_id, entry.round) != (self.run_id, server_round):
            return (
                f"it records run {entry.run_id} round {entry.round}, not run {self.run_id} "
                f"round {server_round}"
            )
        if entry.format != ENTRY_FORMAT:
            # An older format would leave out what the round was (kind, method, unit): a
            # node of this protocol seals the current one.
            return f"its format is {entry.format or 'version 1'}, not {ENTRY_FORMAT}"
        if (
            kind == "training_round"
            and self.methods is not None
            and entry.privacy_method not in self.methods
        ):
            return (
                f"it records method {entry.privacy_method!r}, and this run trains with "
                f"{self.training_method!r}"
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
