"""Model versions: the base model alone (``base``) and every round's global adapter
(``RUN_ID/ROUND``, identified by its checkpoint's SHA-256), and which one is in production.

Promotion is a history, never an update: each ``promote`` adds a row with who and when, and
the latest row is the version in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.common.errors import FedtuneError
from fedtune.platform.db.storage import AdapterCheckpoint, ModelPromotion, Run

BASE = "base"
LATEST = "latest"


class UnknownVersionError(FedtuneError, ValueError):
    """No model version matches what was asked for."""


@dataclass(frozen=True)
class ModelVersion:
    id: str  # "base" or "RUN_ID/ROUND"
    run_id: str | None = None
    round: int | None = None
    sha256: str | None = None
    path: Path | None = None  # the PEFT adapter directory
    created_at: datetime | None = None
    base_model_fingerprint: str | None = None

    @property
    def is_base(self) -> bool:
        return self.id == BASE


def list_versions(engine: Engine) -> list[ModelVersion]:
    """``base`` first, then every checkpoint, oldest first."""
    with transaction(engine) as session:
        rows = session.execute(
            select(AdapterCheckpoint, Run.base_model_fingerprint)
            .join(Run, Run.id == AdapterCheckpoint.run_id)
            .order_by(AdapterCheckpoint.created_at, AdapterCheckpoint.round)
        ).all()
    return [ModelVersion(BASE)] + [
        ModelVersion(
            id=f"{checkpoint.run_id}/{checkpoint.round}",
            run_id=checkpoint.run_id,
            round=checkpoint.round,
            sha256=checkpoint.sha256,
            path=Path(checkpoint.path),
            created_at=checkpoint.created_at,
            base_model_fingerprint=fingerprint,
        )
        for checkpoint, fingerprint in rows
    ]


def resolve_version(engine: Engine, text: str) -> ModelVersion:
    """``base``, ``latest`` (the last round of the newest finished run), ``RUN_ID/ROUND``, or
    a unique prefix of a checkpoint's SHA-256 (at least 8 hex digits)."""
    versions = list_versions(engine)
    if text == LATEST:
        with transaction(engine) as session:
            run = session.scalars(
                select(Run).where(Run.status == "finished").order_by(Run.started_at.desc())
            ).first()
        candidates = [v for v in versions if run is not None and v.run_id == run.id]
        if not candidates:
            raise UnknownVersionError("no finished run has a checkpoint yet ('latest')")
        return max(candidates, key=lambda v: v.round or 0)
    exact = [v for v in versions if v.id == text]
    if exact:
        return exact[0]
    if len(text) >= 8:
        by_sha = [v for v in versions if v.sha256 and v.sha256.startswith(text.lower())]
        if len(by_sha) == 1:
            return by_sha[0]
    known = ", ".join(v.id for v in versions[-5:])
    raise UnknownVersionError(
        f"no model version {text!r}; use 'base', 'latest', RUN_ID/ROUND or a SHA-256 prefix "
        f"(`fedtune model list`; newest: {known})"
    )


def promote(engine: Engine, version: ModelVersion, *, by: str, note: str | None = None) -> None:
    if not by.strip():
        raise ValueError("say who promotes the version (--by)")
    with transaction(engine) as session:
        session.add(
            ModelPromotion(
                version=version.id, adapter_sha256=version.sha256, promoted_by=by, note=note
            )
        )


def promotions(engine: Engine) -> list[ModelPromotion]:
    """Every promotion, newest first."""
    with transaction(engine) as session:
        return list(
            session.scalars(
                select(ModelPromotion).order_by(
                    ModelPromotion.promoted_at.desc(), ModelPromotion.id.desc()
                )
            )
        )


def production_version(engine: Engine) -> str | None:
    history = promotions(engine)
    return history[0].version if history else None
