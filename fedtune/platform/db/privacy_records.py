"""A run's privacy record per node and round, as the coordinator holds it: its copies of the
nodes' signed ledger entries and, only for rounds that have none, the unsigned reports that
fedtune 0.1 stored (``signed=False``). One vocabulary: the ledger entry's field names."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedtune.platform.db.storage import UnsignedEpsilonReport
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
                run_id=entry.run_id,
                round=entry.round,
                node=entry.node,
                data_fingerprint=entry.data_fingerprint,
                mode=entry.mode,
                method=entry.privacy_method,
                privacy_unit=entry.privacy_unit or ("example" if entry.mode == "dp" else None),
                steps=entry.steps,
                sample_rate=entry.sample_rate,
                noise_multiplier=entry.noise_multiplier,
                max_grad_norm=entry.max_grad_norm,
                delta=entry.delta,
                epsilon_round=entry.epsilon_round,
                epsilon_after=entry.epsilon_after,
                epsilon_cap=entry.epsilon_cap,
                accountant=entry.accountant,
                signed=True,
            )
        )
    held = {(r.run_id, r.round, r.node) for r in records}
    for report in session.scalars(unsigned):
        if (report.run_id, report.round, report.node_name) in held:
            continue
        private = report.mode == "dp"
        records.append(
            PrivacyRecord(
                run_id=report.run_id,
                round=report.round,
                node=report.node_name,
                data_fingerprint=report.data_fingerprint,
                mode=report.mode,
                method="dp-sgd" if private else "none",
                privacy_unit="example" if private else None,
                steps=report.steps,
                sample_rate=report.sample_rate,
                noise_multiplier=report.noise_multiplier,
                max_grad_norm=report.max_grad_norm,
                delta=report.delta,
                epsilon_round=report.epsilon_round,
                epsilon_after=report.epsilon,
                epsilon_cap=report.epsilon_cap,
                accountant=report.accountant,
                signed=False,
            )
        )
    return sorted(records, key=lambda r: (r.run_id, r.round, r.node))
