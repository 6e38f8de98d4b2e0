"""`fedtune audit verify` and `report`: an exported ledger file checked offline, against a
public key the auditor trusts, and every epsilon recomputed independently.

The file comes from :mod:`fedtune.privacy.ledger_export`; nothing here opens a database.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.privacy.audit.independent_accounting import Recomputation, recompute_ledger
from fedtune.privacy.audit.report import render_report, write_report
from fedtune.privacy.ledger_file import (
    LedgerFile,
    LedgerVerification,
    read_ledger_file,
    verify_ledger,
)
from fedtune.privacy.signing import load_public_key, public_key_from_text


@dataclass(frozen=True)
class AuditOutcome:
    ledger: LedgerFile
    verification: LedgerVerification
    recomputations: list[Recomputation]
    trusted_key_given: bool

    @property
    def disagreements(self) -> list[Recomputation]:
        return [r for r in self.recomputations if not r.skipped and not r.agrees]

    @property
    def ok(self) -> bool:
        return self.verification.ok and not self.disagreements


def audit_ledger(ledger: Path, *, public_key: str | Path | None) -> AuditOutcome:
    """Verify ``ledger`` (against ``public_key``; without one, against the key its header
    names, which proves integrity but not authorship) and recompute every epsilon."""
    parsed = read_ledger_file(ledger)
    # The header's key is data from the file: its text, never a path on this machine.
    trusted: Ed25519PublicKey = (
        load_public_key(public_key)
        if public_key is not None
        else public_key_from_text(
            str(parsed.header["public_key"]), source=f"{ledger}: the header's public_key"
        )
    )
    verification = verify_ledger(parsed, public_key=trusted)
    # dp-accounting logs each fractional RDP order it drops; the report states the method.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        recomputations = recompute_ledger([entry.to_dict() for entry in parsed.entries])
    finally:
        absl.setLevel(level)
    return AuditOutcome(
        parsed, verification, recomputations, trusted_key_given=public_key is not None
    )


def write_audit_report(
    outcome: AuditOutcome, *, out: Path, egress: Mapping[str, Any] | None = None
) -> Path:
    """The report of ``outcome`` written to ``out``; ``egress``: the node's egress manifest as
    plain data, for its section "What leaves a node"."""
    parsed = outcome.ledger
    verification = outcome.verification
    problem = str(verification.problem) if verification.problem is not None else None
    notes = list(verification.notes)
    if not outcome.trusted_key_given:
        notes.append(
            "verified against the public key named in the file itself, not one the auditor "
            "obtained independently: this proves the ledger is intact, not who signed it"
        )
    html = render_report(
        [entry.to_dict() for entry in parsed.entries],
        verification={
            "ok": verification.ok,
            "problem": problem,
            "summary": {**verification.summary, "notes": notes},
            "public_key": parsed.header.get("public_key"),
        },
        recomputations=outcome.recomputations,
        egress=egress,
    )
    return write_report(out, html)
