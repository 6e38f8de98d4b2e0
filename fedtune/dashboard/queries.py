"""Every read of the coordinator's database the dashboard makes, as pandas DataFrames.

Reads go through fedtune's SQLAlchemy models alone: the database is at this fedtune's newest
migration (:func:`fedtune.dashboard.database.check_database` refuses any other). A round's
privacy record is the node's signed ledger entry (:mod:`fedtune.platform.db.privacy_records`).
Times are UTC.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import JSON, ColumnElement, Select, Table, cast, func, select, type_coerce
from sqlalchemy.engine import Connection, Engine

from fedtune.common.database import transaction
from fedtune.platform.db.privacy_records import PrivacyRecord, privacy_records
from fedtune.platform.db.storage import Base
from fedtune.privacy.ledger_store import LedgerBase

RUN_COLUMNS = (
    "id",
    "name",
    "status",
    "rounds_planned",
    "base_model_spec",
    "started_at",
    "finished_at",
    "error",
)
ROUND_COLUMNS = (
    "number",
    "nodes_sampled",
    "updates_accepted",
    "updates_rejected",
    "train_loss",
    "held_out_loss",
    "seconds",
    "finished_at",
)
PRIVACY_COLUMNS = tuple(PrivacyRecord.__dataclass_fields__)
REJECTION_COLUMNS = ("run_id", "round", "phase", "node_name", "kind", "reason", "created_at")
SIGNAL_COLUMNS = ("run_id", "round", "node_name", "signal", "value", "unavailable")
GROUP_COLUMNS = ("run_id", "round", "node_name", "data_fingerprint", "members", "epsilon_after")
ALERT_COLUMNS = ("run_id", "round", "node_name", "kind", "message", "created_at")
AB_TEST_COLUMNS = (
    "id",
    "version_a",
    "version_b",
    "metrics",
    "alpha",
    "nodes",
    "status",
    "run_id",
    "started_at",
    "finished_at",
    "error",
)
AB_RESULT_COLUMNS = (
    "test_id",
    "scope",
    "metric",
    "higher_is_better",
    "examples",
    "mean_a",
    "mean_b",
    "difference",
    "ci_low",
    "ci_high",
    "confidence",
    "test",
    "p_value",
    "p_adjusted",
    "verdict",
)
PROMOTION_COLUMNS = ("version", "adapter_sha256", "promoted_by", "note", "promoted_at")
TIME_COLUMNS = ("started_at", "finished_at", "created_at", "promoted_at")


def _table(name: str) -> Table:
    """The model's table ``name`` (the coordinator's tables or the ledger's)."""
    if name in Base.metadata.tables:
        return Base.metadata.tables[name]
    return LedgerBase.metadata.tables[name]


def _select(
    table_name: str,
    names: Sequence[str],
    *,
    where: Sequence[tuple[str, Any]] = (),
    order_by: Sequence[str] = (),
) -> Select[Any]:
    """``names`` of ``table_name``, filtered by ``column == value`` pairs (a None value: no
    filter)."""
    table = _table(table_name)
    conditions: list[ColumnElement[bool]] = [
        table.c[name] == value for name, value in where if value is not None
    ]
    statement = select(*(table.c[name] for name in names)).where(*conditions)
    return statement.order_by(*(table.c[name] for name in order_by))


def _read(connection: Connection, statement: Select[Any], names: Sequence[str]) -> pd.DataFrame:
    rows = connection.execute(statement).all()
    return _with_times(pd.DataFrame([tuple(row) for row in rows], columns=list(names)))


def _with_times(frame: pd.DataFrame) -> pd.DataFrame:
    for name in TIME_COLUMNS:
        if name in frame.columns:
            frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame


def runs(engine: Engine) -> pd.DataFrame:
    """One row per run, newest first: its state, rounds done, the nodes that took part and
    the latest global held-out loss (counted by the database: a run may have many rounds)."""
    with engine.connect() as connection:
        frame = _read(connection, _select("runs", RUN_COLUMNS), RUN_COLUMNS)
        done, losses = _rounds_done(connection)
        pairs = ("run_id", "node_name")
        taking_part = pd.concat(
            [
                _read(connection, _select(table, pairs).distinct(), pairs)
                for table in ("node_metrics", "rejected_updates")
            ]
        )
        copies = _table("ledger_entries")
        taking_part = pd.concat(
            [
                taking_part,
                _read(connection, select(copies.c.run_id, copies.c.node).distinct(), pairs),
            ]
        ).dropna()
    frame = frame.rename(columns={"id": "run_id"})
    frame["rounds_done"] = [done.get(run, 0) for run in frame["run_id"]]
    frame["nodes"] = [
        sorted(set(taking_part.loc[taking_part["run_id"] == run, "node_name"]))
        for run in frame["run_id"]
    ]
    frame["held_out_loss"] = [losses.get(run) for run in frame["run_id"]]
    return frame.sort_values("started_at", ascending=False, ignore_index=True)


def _rounds_done(connection: Connection) -> tuple[dict[str, int], dict[str, float]]:
    """Per run: how many rounds finished, and the global held-out loss of the latest round
    that has one."""
    table = _table("rounds")
    counted = select(table.c.run_id, func.count()).group_by(table.c.run_id)
    done = {str(run): int(count) for run, count in connection.execute(counted)}
    known = table.c.held_out_loss.is_not(None)
    latest = (
        select(table.c.run_id, func.max(table.c.number).label("number"))
        .where(known)
        .group_by(table.c.run_id)
        .subquery()
    )
    statement = (
        select(table.c.run_id, table.c.held_out_loss)
        .join(latest, (table.c.run_id == latest.c.run_id) & (table.c.number == latest.c.number))
        .where(known)
    )
    losses = {str(run): float(loss) for run, loss in connection.execute(statement)}
    return done, losses


def rounds(engine: Engine, run_id: str) -> pd.DataFrame:
    """The rounds of ``run_id``, in order."""
    with engine.connect() as connection:
        statement = _select(
            "rounds", ROUND_COLUMNS, where=[("run_id", run_id)], order_by=["number"]
        )
        return _read(connection, statement, ROUND_COLUMNS)


def node_metrics(engine: Engine, run_id: str) -> pd.DataFrame:
    """Each node's figures of ``run_id``, long: round, phase, node_name, metric, value."""
    names = ("round", "phase", "node_name", "metrics")
    with engine.connect() as connection:
        statement = _select(
            "node_metrics", names, where=[("run_id", run_id)], order_by=["round", "id"]
        )
        frame = _read(connection, statement, names)
    rows = [
        {
            "round": row.round,
            "phase": row.phase,
            "node_name": row.node_name,
            "metric": metric,
            "value": value,
        }
        for row in frame.itertuples()
        for metric, value in (row.metrics or {}).items()
    ]
    return pd.DataFrame(rows, columns=["round", "phase", "node_name", "metric", "value"])


def epsilon_reports(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Each node's privacy record per round (of ``run_id``, or of all runs), oldest run
    first, with the run's name and start time: the signed ledger copies, and the unsigned
    reports of fedtune 0.1 only for rounds without one (``signed`` False)."""
    with transaction(engine) as session:
        records = privacy_records(session, run_id)
    with engine.connect() as connection:
        started = _read(
            connection, _select("runs", ("id", "name", "started_at")), ("id", "name", "started_at")
        )
    frame = pd.DataFrame(
        [[getattr(r, name) for name in PRIVACY_COLUMNS] for r in records],
        columns=list(PRIVACY_COLUMNS),
    )
    frame = frame.rename(columns={"node": "node_name"})
    for name in ("epsilon_after", "epsilon_round", "epsilon_cap", "delta"):
        frame[name] = frame[name].astype(float)
    started = started.rename(columns={"id": "run_id", "name": "run_name"})
    frame = frame.merge(started, on="run_id", how="left")
    return frame.sort_values(["started_at", "round"], kind="stable", ignore_index=True)


def entry_field(dialect: str, table: Table, name: str) -> Any:
    """Field ``name`` of the sealed entry's JSON (column ``entry``), read by the database:
    ``json_extract`` in SQLite, ``->>`` in PostgreSQL. Finish with ``.as_string()`` or
    ``.as_float()``."""
    if dialect == "sqlite":  # SQLite's CAST(... AS JSON) would make the text a number
        return type_coerce(table.c.entry, JSON)[name]
    return cast(table.c.entry, JSON)[name]


def rejected_updates(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Replies that were not aggregated (rejected, declined or failed), oldest first."""
    with engine.connect() as connection:
        return _read(
            connection,
            _select(
                "rejected_updates", REJECTION_COLUMNS, where=[("run_id", run_id)], order_by=["id"]
            ),
            REJECTION_COLUMNS,
        )


def health_signals(engine: Engine, run_id: str) -> pd.DataFrame:
    """The health signals of ``run_id`` (node_name None: the global model)."""
    with engine.connect() as connection:
        return _read(
            connection,
            _select(
                "health_signals",
                SIGNAL_COLUMNS,
                where=[("run_id", run_id)],
                order_by=["round", "id"],
            ),
            SIGNAL_COLUMNS,
        )


def budget_groups(engine: Engine) -> pd.DataFrame:
    """The budget groups nodes stated (``data.shares_budget_with``), one row per node and
    round trained, oldest first; ``members`` the group's fingerprints as a list."""
    with engine.connect() as connection:
        frame = _read(
            connection, _select("budget_groups", GROUP_COLUMNS, order_by=["id"]), GROUP_COLUMNS
        )
    frame["members"] = [list(m.get("fingerprints", [])) for m in frame["members"]]
    return frame


def health_alerts(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Health alerts (of ``run_id``, or of all runs), newest first."""
    with engine.connect() as connection:
        frame = _read(
            connection,
            _select("health_alerts", ALERT_COLUMNS, where=[("run_id", run_id)], order_by=["id"]),
            ALERT_COLUMNS,
        )
    return frame.iloc[::-1].reset_index(drop=True)


def ab_tests(engine: Engine) -> pd.DataFrame:
    """A/B tests, newest first."""
    with engine.connect() as connection:
        frame = _read(connection, _select("ab_tests", AB_TEST_COLUMNS), AB_TEST_COLUMNS)
    return frame.sort_values("started_at", ascending=False, ignore_index=True)


def ab_results(engine: Engine, test_id: str) -> pd.DataFrame:
    """The results of A/B test ``test_id``: one row per metric and scope (``overall`` or a
    node's name)."""
    with engine.connect() as connection:
        return _read(
            connection,
            _select(
                "ab_test_results", AB_RESULT_COLUMNS, where=[("test_id", test_id)], order_by=["id"]
            ),
            AB_RESULT_COLUMNS,
        )


def latest_promotion(engine: Engine) -> dict[str, Any] | None:
    """The model version in production (the latest promotion), or None."""
    with engine.connect() as connection:
        frame = _read(
            connection,
            _select("model_promotions", PROMOTION_COLUMNS, order_by=["promoted_at"]),
            PROMOTION_COLUMNS,
        )
    return None if frame.empty else dict(frame.iloc[-1])


def ledger_copy_nodes(engine: Engine) -> list[str]:
    """Nodes with a ledger copy or an enrolled key in this database."""
    entries, keys = _table("ledger_entries"), _table("ledger_keys")
    with engine.connect() as connection:
        nodes = connection.scalars(
            select(entries.c.node).distinct().union(select(keys.c.node).distinct())
        )
        return sorted(set(nodes))


@dataclass(frozen=True)
class CopyHead:
    """What identifies the state of a node's ledger copy: the tables are append-only, so the
    same count, head, latest checkpoint and keys mean the same copy (a verdict on it holds)."""

    node: str
    entries: int
    head_seq: int | None
    head_hash: str | None
    checkpoint: str | None  # the latest signed checkpoint's JSON
    keys: tuple[str, ...]


def ledger_heads(engine: Engine) -> list[CopyHead]:
    """The state of every node's ledger copy (nodes with only a key: no entries), without
    reading the entries."""
    nodes = ledger_copy_nodes(engine)
    entries, keys = _table("ledger_entries"), _table("ledger_keys")
    checkpoints = _table("ledger_checkpoints")
    heads = []
    with engine.connect() as connection:
        grouped = select(entries.c.node, func.count()).group_by(entries.c.node)
        counts: dict[str, int] = {str(n): int(c) for n, c in connection.execute(grouped).all()}
        for node in nodes:
            head = connection.execute(
                select(entries.c.seq, entries.c.hash)
                .where(entries.c.node == node)
                .order_by(entries.c.seq.desc())
                .limit(1)
            ).first()
            checkpoint = connection.scalars(
                select(checkpoints.c.checkpoint)
                .where(checkpoints.c.node == node)
                .order_by(checkpoints.c.seq.desc(), checkpoints.c.id.desc())
                .limit(1)
            ).first()
            public_keys = connection.scalars(
                select(keys.c.public_key).where(keys.c.node == node).order_by(keys.c.id)
            ).all()
            heads.append(
                CopyHead(
                    node=node,
                    entries=int(counts.get(node, 0)),
                    head_seq=None if head is None else int(head.seq),
                    head_hash=None if head is None else str(head.hash),
                    checkpoint=checkpoint,
                    keys=tuple(public_keys),
                )
            )
    return heads


@dataclass(frozen=True)
class LedgerFilter:
    """Which of ``node``'s ledger entries to show: empty fields do not filter."""

    node: str
    runs: tuple[str, ...] = ()
    data_sets: tuple[str, ...] = ()
    days: tuple[dt.date, dt.date] | None = None  # recorded between, both included (UTC)

    @property
    def filters(self) -> bool:
        return bool(self.runs or self.data_sets or self.days)


@dataclass(frozen=True)
class LedgerFacets:
    """What a node's ledger copy holds, to offer as filters: its size, its runs and data
    sets, and the days its entries were recorded on."""

    entries: int
    runs: tuple[str, ...]
    data_sets: tuple[str, ...]
    first_day: dt.date | None
    last_day: dt.date | None


def ledger_facets(engine: Engine, node: str) -> LedgerFacets:
    """The size, runs, data sets and recording days of ``node``'s ledger copy, counted by
    the database."""
    table = _table("ledger_entries")
    mine = table.c.node == node
    with engine.connect() as connection:
        recorded = entry_field(connection.dialect.name, table, "recorded_at").as_string()
        count, first, last = connection.execute(
            select(func.count(), func.min(recorded), func.max(recorded)).where(mine)
        ).one()
        runs = connection.scalars(
            select(table.c.run_id).where(mine).distinct().order_by(table.c.run_id)
        ).all()
        data_sets = connection.scalars(
            select(table.c.data_fingerprint)
            .where(mine)
            .distinct()
            .order_by(table.c.data_fingerprint)
        ).all()
    return LedgerFacets(
        entries=int(count),
        runs=tuple(runs),
        data_sets=tuple(data_sets),
        first_day=_day(first),
        last_day=_day(last),
    )


def _day(recorded_at: str | None) -> dt.date | None:
    """The UTC day of an entry's ``recorded_at`` (``2026-11-23T19:00:00.123456Z``)."""
    if not recorded_at:
        return None
    try:
        return dt.date.fromisoformat(recorded_at[:10])
    except ValueError:
        return None


def _ledger_conditions(
    connection: Connection, table: Table, wanted: LedgerFilter
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [table.c.node == wanted.node]
    if wanted.runs:
        conditions.append(table.c.run_id.in_(wanted.runs))
    if wanted.data_sets:
        conditions.append(table.c.data_fingerprint.in_(wanted.data_sets))
    if wanted.days is not None:
        # recorded_at is UTC ISO 8601 ending in Z: its text sorts as its time does.
        recorded = entry_field(connection.dialect.name, table, "recorded_at").as_string()
        first, last = wanted.days
        conditions.append(recorded >= first.isoformat())
        conditions.append(recorded < (last + dt.timedelta(days=1)).isoformat())
    return conditions


def ledger_count(engine: Engine, wanted: LedgerFilter) -> int:
    """How many of the node's ledger entries ``wanted`` keeps."""
    table = _table("ledger_entries")
    with engine.connect() as connection:
        statement = select(func.count()).where(*_ledger_conditions(connection, table, wanted))
        return int(connection.execute(statement).scalar_one())


def ledger_page(engine: Engine, wanted: LedgerFilter, *, offset: int, limit: int) -> pd.DataFrame:
    """Entries ``offset`` to ``offset + limit`` (in seq order) of those ``wanted`` keeps, one
    row per entry, with the entry's fields (mode, steps, epsilon, cap, delta, accountant,
    recorded_at) spread into columns. Only that page is read from the database."""
    table = _table("ledger_entries")
    with engine.connect() as connection:
        statement = (
            select(table.c.entry)
            .where(*_ledger_conditions(connection, table, wanted))
            .order_by(table.c.seq)
            .offset(max(0, offset))
            .limit(max(0, limit))
        )
        texts = connection.scalars(statement).all()
    return _entry_frame(texts)


def _entry_frame(texts: Sequence[str]) -> pd.DataFrame:
    fields = pd.json_normalize([_json(text) for text in texts])
    if fields.empty:
        return pd.DataFrame(columns=["seq", "recorded_at"])
    fields["recorded_at"] = pd.to_datetime(fields["recorded_at"], utc=True, errors="coerce")
    return fields


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# --- costs, protections and node-level epsilon ------------------------------------------------

COST_COLUMNS = (
    "round",
    "phase",
    "node_name",
    "train_tokens",
    "evaluate_tokens",
    "train_device_seconds",
    "evaluate_device_seconds",
    "wall_seconds",
    "refused",
)


def node_costs(engine: Engine, run_id: str) -> pd.DataFrame:
    """Each node reply's cost figures in ``run_id`` (one row per round, phase and node), in
    the order stored; a figure not sent or refused is None (NaN)."""
    with engine.connect() as connection:
        statement = _select(
            "node_costs", COST_COLUMNS, where=[("run_id", run_id)], order_by=["round", "id"]
        )
        frame = _read(connection, statement, COST_COLUMNS)
    for name in COST_COLUMNS[3:8]:
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(float)
    return frame


def stored_protections(engine: Engine, run_id: str) -> dict[str, Any] | None:
    """The protections ``run_id`` recorded when it started (None: not recorded)."""
    table = _table("runs")
    with engine.connect() as connection:
        value = connection.scalar(select(table.c.protections).where(table.c.id == run_id))
    if isinstance(value, str):  # a driver that hands JSON back as text
        value = _json(value)
    return value if isinstance(value, dict) and value else None


NODE_LEVEL_COLUMNS = (
    "run_id",
    "round",
    "seq",
    "epsilon_after",
    "entry",
    "checkpoint",
    "public_key",
)


def node_level_entries(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Copies of the coordinator's node-level DP ledger entries (of ``run_id``, or of every
    run), with the entry's delta, noise multiplier and clipping norm spread into columns."""
    with engine.connect() as connection:
        statement = _select(
            "node_level_entries",
            NODE_LEVEL_COLUMNS,
            where=[("run_id", run_id)],
            order_by=["run_id", "seq"],
        )
        frame = _read(connection, statement, NODE_LEVEL_COLUMNS)
    fields = [_json(text) for text in frame["entry"]]
    for name in ("delta", "noise_multiplier", "max_grad_norm", "epsilon_cap"):
        frame[name] = pd.to_numeric(pd.Series([f.get(name) for f in fields]), errors="coerce")
    frame["epsilon_after"] = frame["epsilon_after"].astype(float)
    return frame


def run_ledger_evidence(engine: Engine, run_id: str) -> dict[str, int]:
    """How many of ``run_id``'s ledger copies the database holds, and how many of them the
    coordinator countersigned (a receipt for the entry's own seq)."""
    entries, receipts = _table("ledger_entries"), _table("ledger_receipts")
    with engine.connect() as connection:
        held = connection.scalar(select(func.count()).where(entries.c.run_id == run_id))
        witnessed = connection.scalar(
            select(func.count(func.distinct(entries.c.id)))
            .select_from(entries)
            .join(
                receipts,
                (receipts.c.node == entries.c.node) & (receipts.c.seq == entries.c.seq),
            )
            .where(entries.c.run_id == run_id)
        )
    return {"entries": int(held or 0), "receipts": int(witnessed or 0)}
