"""The files an auditor takes away from the dashboard for one node's ledger copy (the ledger
JSONL and the HTML report), made by the privacy core's reader, exporter, verifier and report
(:mod:`fedtune.privacy.ledger_copies`, :mod:`fedtune.privacy.audit`), never reimplemented
here.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from fedtune.dashboard.database import DashboardError
from fedtune.privacy.audit.verify import audit_ledger, write_audit_report
from fedtune.privacy.ledger import LedgerFormatError
from fedtune.privacy.ledger_copies import read_copy
from fedtune.privacy.ledger_file import format_verification, write_ledger_file


@dataclass(frozen=True)
class AuditFiles:
    """What an auditor downloads for one node: the ledger JSONL and the HTML report."""

    node: str
    entries: int
    jsonl: bytes
    html: bytes
    ok: bool  # chain and signatures verify and every epsilon recomputes
    summary: str  # the verifier's verdict, as ``fedtune audit verify`` prints it

    @property
    def jsonl_name(self) -> str:
        return f"{_file_name(self.node)}-ledger.jsonl"

    @property
    def html_name(self) -> str:
        return f"{_file_name(self.node)}-audit-report.html"


def audit_files(engine: Engine, node: str) -> AuditFiles:
    """Export ``node``'s ledger copy as the auditor's JSONL and render its HTML report
    (verified against the node's key stored in the database, every epsilon recomputed).

    Raises :class:`DashboardError` when the copy cannot be exported (no entries, no key, no
    signed head of its last entry)."""
    try:
        copy = read_copy(engine, node)
    except LedgerFormatError as error:
        raise DashboardError(
            f"the ledger copy of {node} holds a malformed entry: {error}"
        ) from None
    if not copy.entries:
        raise DashboardError(f"no ledger entries of {node} in this database")
    if not copy.keys or copy.checkpoint is None:
        raise DashboardError(f"this database holds no public key or no signed head for {node}")
    with tempfile.TemporaryDirectory(prefix="fedtune-audit-") as folder:
        ledger = Path(folder) / "ledger.jsonl"
        try:
            write_ledger_file(
                ledger,
                node=node,
                public_key=copy.keys[-1],
                entries=copy.entries,
                checkpoint=copy.checkpoint,
            )
        except ValueError as error:
            raise DashboardError(f"cannot export the ledger copy of {node}: {error}") from None
        outcome = audit_ledger(ledger, public_key=copy.keys[-1])
        report = write_audit_report(outcome, out=Path(folder) / "report.html")
        return AuditFiles(
            node=node,
            entries=len(copy.entries),
            jsonl=ledger.read_bytes(),
            html=report.read_bytes(),
            ok=outcome.ok,
            summary=format_verification(outcome.verification).replace(str(ledger), node),
        )


def _file_name(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", node).strip("-.") or "node"
