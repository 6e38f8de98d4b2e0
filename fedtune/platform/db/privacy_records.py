"""A run's privacy record per node and round, as the coordinator holds it: its copies of the
nodes' signed ledger entries and, only for rounds that have none, the unsigned reports that
fedtune 0.1 stored (``signed=False``). One vocabulary: the ledger entry's field names."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedtune.platform.db.storage import UnsignedEpsilonReport
from fedtune.privacy.ledger import version_one_reading
from fedtune.privacy.ledger_store import LedgerEntryRow, entry_from_json


@dataclass(frozen=True)
class PrivacyRecord:
    run_id: str
    round: int
    node: str
    data_fingerprint: str
    mode: str
    method: str
    privacy_unit: str | None
    steps: int
    sample_rate: float
    noise_multiplier: float | None
    max_grad_norm: float | None
    delta: float | None
    epsilon_round: float | None
    epsilon_after: float | None
    epsilon_cap: float | None
    accountant: str | None
    signed: bool  # False: an unsigned report of fedtune 0.1, for a round with no signed copy


# Fields a signed entry and an unsigned report both hold under these names.
_SHARED = (
    "run_id",
    "round",
    "data_fingerprint",
    "mode",
    "steps",
    "sample_rate",
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon_round",
    "epsilon_cap",
    "accountant",
)


def privacy_records(session: Session, run_id: str | None = None) -> list[PrivacyRecord]:
    """The records of run ``run_id`` (None: of every run), by run, round and node."""
    signed = select(LedgerEntryRow.entry).order_by(LedgerEntryRow.id)
    unsigned = select(UnsignedEpsilonReport).order_by(UnsignedEpsilonReport.id)
    if run_id is not None:
        signed = signed.where(LedgerEntryRow.run_id == run_id)
        unsigned = unsigned.where(UnsignedEpsilonReport.run_id == run_id)
    records = []
    for text in session.scalars(signed):  # the entries' JSON alone: no ORM object per row
        entry = entry_from_json(text)
        records.append(
            PrivacyRecord(
                **{name: getattr(entry, name) for name in _SHARED},
                node=entry.node,
                epsilon_after=entry.epsilon_after,
                method=entry.privacy_method,
                privacy_unit=entry.protected_unit,
                signed=True,
            )
        )
    held = {(r.run_id, r.round, r.node) for r in records}
    for report in session.scalars(unsigned):
        if (report.run_id, report.round, report.node_name) in held:
            continue
        method, unit = version_one_reading(report.mode)
        records.append(
            PrivacyRecord(
                **{name: getattr(report, name) for name in _SHARED},
                node=report.node_name,
                epsilon_after=report.epsilon,
                method=method,
                privacy_unit=unit,
                signed=False,
            )
        )
    return sorted(records, key=lambda r: (r.run_id, r.round, r.node))
