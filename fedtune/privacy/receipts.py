"""Witness receipts: the coordinator's countersignature of a node's ledger head.

A node signs its own ledger, so it can always produce an earlier prefix of it (drop the last
entries, put back an older signed checkpoint) or rewrite its tail and sign again: the file
still verifies. Only a witness that saw the later head can tell. As in Certificate
Transparency (RFC 9162), where a log's signed tree heads are gossiped so that a log that
shows two histories is caught, the coordinator countersigns every head it receives and
stores; the node keeps the receipt beside its entries, and an auditor given the witness's
public key checks that the ledger still reaches, unchanged, every head the witness saw.

A receipt is ``{"format", "node", "seq", "head_hash", "witness", "witnessed_at",
"signature"}``: ``witness`` is the base64 text of the coordinator's Ed25519 witness key, and
``signature`` that key's signature over the RFC 8785 JSON of the other six fields
(``docs/ledger-format.md``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.privacy.ledger import (
    LedgerEntry,
    LedgerFormatError,
    _check_hex_hash,
    _check_int,
    _check_text,
    _check_time,
    utc_now_text,
)
from fedtune.privacy.signing import NodeKey, decode_signature, public_key_text, verify_signature

RECEIPT_FORMAT = "fedtune-receipt/1"
RECEIPT_FIELDS = ("format", "node", "seq", "head_hash", "witness", "witnessed_at", "signature")


@dataclass(frozen=True)
class Receipt:
    """The witness saw ``node``'s ledger with head ``seq`` / ``head_hash``."""

    format: str
    node: str
    seq: int
    head_hash: str
    witness: str
    witnessed_at: str
    signature: str

    def __post_init__(self) -> None:
        if self.format != RECEIPT_FORMAT:
            raise LedgerFormatError(
                f"receipt: format must be {RECEIPT_FORMAT!r}, got {self.format!r}"
            )
        try:
            _check_fields(self.to_dict())
            if decode_signature(self.signature) is None:
                raise ValueError("signature must be the base64 text of a 64-byte signature")
        except ValueError as error:
            raise LedgerFormatError(f"receipt: {error}") from None

    def signed_message(self) -> bytes:
        """The bytes the witness signed."""
        return rfc8785.dumps({k: v for k, v in self.to_dict().items() if k != "signature"})

    def signed_by(self, witness_key: Ed25519PublicKey) -> bool:
        """Whether ``witness_key`` made this receipt (it names that key and signed it)."""
        return self.witness == public_key_text(witness_key) and verify_signature(
            witness_key, signature=self.signature, message=self.signed_message()
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RECEIPT_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Receipt:
        """The receipt ``data`` describes; ``LedgerFormatError`` names bad fields."""
        if not isinstance(data, Mapping):
            raise LedgerFormatError("a receipt must be a JSON object")
        missing = [name for name in RECEIPT_FIELDS if name not in data]
        unknown = sorted(str(name) for name in data if name not in RECEIPT_FIELDS)
        if missing:
            raise LedgerFormatError("receipt: missing fields: " + ", ".join(missing))
        if unknown:
            raise LedgerFormatError("receipt: unknown fields: " + ", ".join(unknown))
        return cls(**{name: data[name] for name in RECEIPT_FIELDS})


def sign_receipt(
    *, node: str, seq: int, head_hash: str, witness: NodeKey, witnessed_at: str | None = None
) -> Receipt:
    """``witness``'s receipt for ``node``'s ledger head ``seq`` / ``head_hash``."""
    fields: dict[str, Any] = {
        "format": RECEIPT_FORMAT,
        "node": node,
        "seq": seq,
        "head_hash": head_hash,
        "witness": witness.public_key_text(),
        "witnessed_at": witnessed_at or utc_now_text(),
    }
    _check_fields(fields)
    signature = witness.sign(rfc8785.dumps(fields))
    return Receipt(**fields, signature=signature)


def witness_of(entry: LedgerEntry, witness: NodeKey) -> Receipt:
    """``witness``'s receipt for a ledger whose head is ``entry``."""
    return sign_receipt(node=entry.node, seq=entry.seq, head_hash=entry.hash, witness=witness)


@dataclass(frozen=True)
class WitnessCheck:
    """What the receipts say about a ledger: ``problem`` (rollback, fork, a bad receipt) or
    None, and ``notes`` that do not make it fail."""

    problem: str | None
    seq: int | None
    notes: tuple[str, ...]
    witnessed_seq: int  # the highest seq a valid receipt covers (0: none)


def check_witnessed(
    entries: Sequence[LedgerEntry],
    receipts: Sequence[Receipt],
    *,
    node: str,
    witness_key: Ed25519PublicKey,
) -> WitnessCheck:
    """Whether the ledger ``entries`` (already verified under the node's key) reach, unchanged,
    every head ``witness_key`` countersigned in ``receipts``.

    A receipt beyond the last entry means the ledger was rolled back; one whose hash differs
    from the entry at its seq, that the ledger was forked (rewritten after the witness saw it).
    """
    by_seq = {entry.seq: entry for entry in entries}
    last = entries[-1].seq if entries else 0
    witnessed = 0
    # Receipts of other witnesses (another consortium's coordinator, a rotated key) are set
    # aside: they neither vouch for this ledger nor condemn it. Hiding one this way hides no
    # more than deleting it, which only the coordinator's copy reveals.
    trusted = public_key_text(witness_key)
    others = [receipt for receipt in receipts if receipt.witness != trusted]
    receipts = [receipt for receipt in receipts if receipt.witness == trusted]
    for receipt in receipts:
        if receipt.node != node:
            return _fails(f"a receipt for seq {receipt.seq} names node {receipt.node!r}", receipt)
        if not receipt.signed_by(witness_key):
            return _fails(
                f"receipt for seq {receipt.seq}: signature does not match the witness key", receipt
            )
    for receipt in sorted(receipts, key=lambda r: r.seq):
        problem = head_problem(by_seq, last, receipt.seq, receipt.head_hash, receipt.witnessed_at)
        if problem is not None:
            return _fails(problem, receipt)
        witnessed = max(witnessed, receipt.seq)
    notes: list[str] = []
    if others:
        notes.append(
            f"{len(others)} receipts from other witnesses set aside (not the witness key given)"
        )
    if not receipts:
        notes.append(
            "no receipt from the witness: nothing in the file shows the coordinator saw this "
            "ledger; compare it with the coordinator's copy"
        )
    elif witnessed < last:
        notes.append(
            f"seq {witnessed + 1}-{last} not witnessed: rounds trained without the coordinator "
            "(fedtune node train), or receipts removed; compare with the coordinator's copy"
        )
    return WitnessCheck(None, None, tuple(notes), witnessed)


def head_problem(
    by_seq: Mapping[int, LedgerEntry], last: int, seq: int, head_hash: str, seen_at: str
) -> str | None:
    """Why a ledger ending at ``last`` (entries ``by_seq``) does not reach a head ``seq`` /
    ``head_hash`` someone else saw at ``seen_at``: rolled back, or forked."""
    if seq > last:
        return (
            f"rolled back: the coordinator witnessed seq {seq} (at {seen_at}) but the ledger "
            f"ends at seq {last}"
        )
    entry = by_seq.get(seq)
    if entry is not None and entry.hash != head_hash:
        return (
            f"forked: the coordinator witnessed seq {seq} with hash {head_hash[:12]}, the "
            f"ledger's seq {seq} has hash {entry.hash[:12]}"
        )
    return None


def _fails(problem: str, receipt: Receipt) -> WitnessCheck:
    return WitnessCheck(problem, receipt.seq, (), 0)


def _check_fields(fields: Mapping[str, Any]) -> None:
    _check_text("node", fields["node"])
    _check_int("seq", fields["seq"], minimum=1)
    _check_hex_hash("head_hash", fields["head_hash"])
    _check_text("witness", fields["witness"])
    try:
        raw = base64.b64decode(str(fields["witness"]), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError("witness must be the base64 text of a 32-byte Ed25519 public key")
    _check_time("witnessed_at", fields["witnessed_at"])


__all__ = [
    "RECEIPT_FIELDS",
    "RECEIPT_FORMAT",
    "Receipt",
    "WitnessCheck",
    "check_witnessed",
    "head_problem",
    "sign_receipt",
    "witness_of",
]
