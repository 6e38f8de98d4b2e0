"""The coordinator's database: runs, rounds, per-node metrics, adapter checkpoints and
rejected updates (SQLAlchemy 2.x; SQLite by default, any SQLAlchemy URL). Each round's privacy
record is the node's signed ledger entry, whose copies live in the ledger tables of
:mod:`fedtune.privacy.ledger_store` in the same database.

The schema comes from Alembic migrations (:mod:`fedtune.platform.db.migrations`): a change to
the models here needs a new revision. Flower's run and node ids are unsigned 64-bit integers,
beyond a signed BIGINT: they are stored as text. Times are stored in UTC and read back as
aware UTC datetimes, SQLite included (:class:`UTCDateTime`). One round's writes go through
one session and commit together (:func:`transaction`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedtune.common.database import connect, database_url
from fedtune.common.sqltypes import UTCDateTime
from fedtune.platform.db import migrations
from fedtune.platform.db.migrations import DatabaseVersionError as DatabaseVersionError


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: UTCDateTime,
    }


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    flower_run_id: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # running | finished | failed
    rounds_planned: Mapped[int] = mapped_column(Integer)
    base_model_spec: Mapped[str] = mapped_column(Text)
    base_model_fingerprint: Mapped[str] = mapped_column(String(80))
    config: Mapped[dict[str, Any]]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    # What protected the run, as the coordinator knew it when the run started (transport,
    # node authentication, secure aggregation, DP settings, metric release...): see
    # fedtune.coordinator.run_protections. None: a run from before fedtune recorded it.
    protections: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    nodes_sampled: Mapped[int] = mapped_column(Integer)
    updates_accepted: Mapped[int] = mapped_column(Integer)
    updates_rejected: Mapped[int] = mapped_column(Integer)  # rejected, declined or failed
    train_loss: Mapped[float | None] = mapped_column(Float)  # weighted by examples
    held_out_loss: Mapped[float | None] = mapped_column(Float)  # global model, weighted
    seconds: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeMetric(Base):
    """One node's figures in one round: ``phase`` is ``train`` (its own update) or
    ``evaluate`` (the global model on its held-out data)."""

    __tablename__ = "node_metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    node_name: Mapped[str] = mapped_column(String(200))
    flower_node_id: Mapped[str] = mapped_column(String(32))
    num_examples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]


class NodeCost(Base):
    """What one node's reply says its work on one message cost: ``phase`` is ``train`` (the
    round's training and any local evaluation) or ``evaluate`` (the global model on its
    held-out data). Tokens are those the forward passes read (padding excluded);
    device-seconds the compute loops' time on the node's device; wall seconds the node's
    whole time on the message. A figure the node did not send (its release_metrics) is None;
    one the coordinator refused (negative, not finite, absurdly large, of the wrong type) is
    None too, with ``refused`` saying what was refused and why."""

    __tablename__ = "node_costs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    node_name: Mapped[str] = mapped_column(String(200))
    flower_node_id: Mapped[str] = mapped_column(String(32))
    train_tokens: Mapped[int | None] = mapped_column(BigInteger)
    evaluate_tokens: Mapped[int | None] = mapped_column(BigInteger)
    train_device_seconds: Mapped[float | None] = mapped_column(Float)
    evaluate_device_seconds: Mapped[float | None] = mapped_column(Float)
    wall_seconds: Mapped[float | None] = mapped_column(Float)
    refused: Mapped[str | None] = mapped_column(Text)


class BudgetGroup(Base):
    """A node's budget group as its train reply stated it (``data.shares_budget_with``): the
    data sets holding the same people, whose private rounds its budget guard composes into
    one epsilon. ``data_fingerprint`` is the trained data set's, from the round's verified
    ledger entry; ``members`` every fingerprint of the group, that one included;
    ``epsilon_after`` the group's epsilon after the round as the node's guard counted it
    (its word; the dashboard recomputes it from the ledger copies)."""

    __tablename__ = "budget_groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    node_name: Mapped[str] = mapped_column(String(200))
    data_fingerprint: Mapped[str] = mapped_column(String(80))
    members: Mapped[dict[str, Any]]  # {"fingerprints": [...]}
    epsilon_after: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeLevelEntry(Base):
    """A copy of one entry of the coordinator's own node-level DP ledger
    (``OUTPUT_DIR/node-level-ledger``, node ``coordinator``): the sealed entry and the signed
    head exactly as signed, with the ledger's public key. Each run's ledger is its own chain
    (its own key, seq from 1), hence one row per run and seq. Append-only, like the nodes'
    ledger copies."""

    __tablename__ = "node_level_entries"
    __table_args__ = (UniqueConstraint("run_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    epsilon_after: Mapped[float | None] = mapped_column(Float)
    entry: Mapped[str] = mapped_column(Text)  # the sealed entry's JSON, exactly as signed
    checkpoint: Mapped[str] = mapped_column(Text)  # the signed head after it
    public_key: Mapped[str] = mapped_column(String(64))  # base64 of the raw Ed25519 key


class UnsignedEpsilonReport(Base):
    """What nodes reported of a round's epsilon beside the signed ledger entry, up to fedtune
    0.1 (migration 0004 kept every row). Read only: a round's privacy record is its signed
    ledger entry (:mod:`fedtune.platform.db.privacy_records`); these rows are shown, marked
    unsigned, only for rounds that have no signed copy."""

    __tablename__ = "unsigned_epsilon_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    node_name: Mapped[str] = mapped_column(String(200))
    data_fingerprint: Mapped[str] = mapped_column(String(80))
    mode: Mapped[str] = mapped_column(String(16))  # dp | non-private
    epsilon: Mapped[float | None] = mapped_column(Float)
    epsilon_round: Mapped[float | None] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    noise_multiplier: Mapped[float | None] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    max_grad_norm: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    accountant: Mapped[str | None] = mapped_column(String(80))
    epsilon_cap: Mapped[float | None] = mapped_column(Float)


class AdapterCheckpoint(Base):
    __tablename__ = "adapter_checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))  # of adapter_model.safetensors
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RejectedUpdate(Base):
    """A reply that was not aggregated: ``kind`` is ``rejected`` (the coordinator refused
    it), ``declined`` (the node chose not to train) or ``failed`` (the node reported an
    error)."""

    __tablename__ = "rejected_updates"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    node_name: Mapped[str | None] = mapped_column(String(200))
    flower_node_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelPromotion(Base):
    """Who put which model version in production, and when; the latest row is in use.

    A version is ``base`` (the base model alone) or ``RUN_ID/ROUND`` (that round's global
    adapter, see :class:`AdapterCheckpoint`)."""

    __tablename__ = "model_promotions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(120))
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    promoted_by: Mapped[str] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)
    promoted_at: Mapped[datetime] = mapped_column(default=utcnow)


class AbTest(Base):
    """A federated A/B test of two model versions on the nodes' held-out data."""

    __tablename__ = "ab_tests"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_a: Mapped[str] = mapped_column(String(120))
    version_b: Mapped[str] = mapped_column(String(120))
    metrics: Mapped[dict[str, Any]]  # {"names": [...], "max_examples": N, ...} as requested
    alpha: Mapped[float] = mapped_column(Float)
    nodes: Mapped[dict[str, Any]]  # {"requested": [...] or None, "answered": [...]}
    status: Mapped[str] = mapped_column(String(16))  # running | finished | failed
    run_id: Mapped[str | None] = mapped_column(String(64))  # set when a run started it
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class AbTestResult(Base):
    """One metric of an A/B test, for one node or ``overall``: B minus A, oriented so that a
    positive ``improvement`` means B is better."""

    __tablename__ = "ab_test_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    test_id: Mapped[str] = mapped_column(ForeignKey("ab_tests.id"), index=True)
    scope: Mapped[str] = mapped_column(String(200))  # a node name, or "overall"
    metric: Mapped[str] = mapped_column(String(40))  # loss | rouge-l | exact-match
    higher_is_better: Mapped[bool]
    examples: Mapped[int] = mapped_column(Integer)
    mean_a: Mapped[float | None] = mapped_column(Float)
    mean_b: Mapped[float | None] = mapped_column(Float)
    difference: Mapped[float | None] = mapped_column(Float)  # mean of (B - A)
    ci_low: Mapped[float | None] = mapped_column(Float)  # of the difference
    ci_high: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)  # e.g. 0.95
    test: Mapped[str] = mapped_column(String(80))  # e.g. "paired t-test"
    p_value: Mapped[float | None] = mapped_column(Float)
    p_adjusted: Mapped[float | None] = mapped_column(Float)  # Holm, across the metrics
    verdict: Mapped[str] = mapped_column(String(40))  # b better | a better | no significant ...
    detail: Mapped[dict[str, Any]]  # e.g. per-example scores shared or only statistics


class HealthSignal(Base):
    """One model-health figure of one round, for one node or the global model (node None).
    ``value`` is None with ``unavailable`` saying why when the signal cannot be computed
    under the run's protections (e.g. single updates hidden by secure aggregation)."""

    __tablename__ = "health_signals"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    node_name: Mapped[str | None] = mapped_column(String(200))
    signal: Mapped[str] = mapped_column(String(40))
    value: Mapped[float | None] = mapped_column(Float)
    unavailable: Mapped[str | None] = mapped_column(Text)


class HealthAlert(Base):
    """Something an admin should look at: ``kind`` is loss-rising, outlier-update,
    near-cap, divergence, non-finite, declined or failed."""

    __tablename__ = "health_alerts"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    node_name: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnrolledNode(Base):
    """A node `fedtune coordinator enroll` registered with the SuperLink: the roster the
    ServerApp maps connected SuperNodes to names with (a node's own word is not trusted).

    ``auth_public_key`` is the SuperNode key as Flower's SuperLink stores and reports it
    (``NodeInfo.public_key``): PEM SubjectPublicKeyInfo text. One row per name; enrolling a
    rotated key replaces the row's key and node id. ``certificate``: the node's enrollment
    certificate (:mod:`fedtune.platform.security.enrollment_certificates`), relayed to its peers."""

    __tablename__ = "enrolled_nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    auth_public_key: Mapped[str] = mapped_column(String(400), unique=True)
    flower_node_id: Mapped[str] = mapped_column(String(32))
    certificate: Mapped[str | None] = mapped_column(Text, default=None)
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)


def open_database(url: str, *, create: bool = True) -> Engine:
    """An engine for ``url`` (see :func:`fedtune.common.database.connect`).

    ``create``: bring the schema to the newest migration first: a new database gets every
    table, one made before migrations is adopted keeping its rows (see
    :mod:`fedtune.platform.db.migrations`). Without it the schema is left as it is.
    """
    engine = connect(url)
    if create:
        with engine.begin() as connection:
            migrations.upgrade(connection, url)
    return engine


def upgrade_database(url: str) -> str:
    """Migrate the database at ``url`` to the newest revision; returns that revision.

    Raises :class:`DatabaseVersionError` when a newer fedtune has migrated it further.
    """
    engine = open_database(url, create=False)
    try:
        with engine.begin() as connection:
            return migrations.upgrade(connection, url)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The migration revision of the database at ``url`` (None: not migrated yet)."""
    engine = open_database(database_url(url, must_exist=True), create=False)
    try:
        with engine.connect() as connection:
            return migrations.database_revision(connection)
    finally:
        engine.dispose()
