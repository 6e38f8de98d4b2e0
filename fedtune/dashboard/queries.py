"""Every read of the coordinator's database the dashboard makes, as pandas DataFrames.

Older databases lack newer tables and columns (A/B tests, health signals, ledger copies,
epsilon caps): a missing table reads as an empty frame and a missing column as nulls, so
that a page can say what is absent instead of failing. Times are UTC.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import ColumnElement, Table, null, select
from sqlalchemy.engine import Connection, Engine

from fedtune.dashboard.database import Schema, read_schema
from fedtune.platform.ledger_store import LedgerBase, LedgerKeyRow, ledger_nodes
from fedtune.platform.storage import Base, transaction

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
EPSILON_COLUMNS = (
    "run_id",
    "round",
    "node_name",
    "data_fingerprint",
    "mode",
    "epsilon",
    "epsilon_round",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "max_grad_norm",
    "steps",
    "accountant",
    "epsilon_cap",
)
REJECTION_COLUMNS = ("run_id", "round", "phase", "node_name", "kind", "reason", "created_at")
SIGNAL_COLUMNS = ("run_id", "round", "node_name", "signal", "value", "unavailable")
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
    if name in Base.metadata.tables:
        return Base.metadata.tables[name]
    return LedgerBase.metadata.tables[name]


def _read(
    connection: Connection,
    schema: Schema,
    table_name: str,
    names: Sequence[str],
    *,
    where: Sequence[tuple[str, Any]] = (),
    order_by: Sequence[str] = (),
    distinct: bool = False,
) -> pd.DataFrame:
    """``names`` of ``table_name`` (nulls for columns this database lacks), filtered by
    ``column == value`` pairs (a None value: no filter); an empty frame when the table itself
    is missing."""
    if not schema.has(table_name):
        return pd.DataFrame(columns=list(names))
    table = _table(table_name)
    present = schema.columns[table_name]
    columns = [table.c[name] if name in present else null().label(name) for name in names]
    conditions: list[ColumnElement[bool]] = [
        table.c[name] == value for name, value in where if value is not None
    ]
    statement = select(*columns).where(*conditions)
    if distinct:
        statement = statement.distinct()
    statement = statement.order_by(*(table.c[name] for name in order_by if name in present))
    rows = connection.execute(statement).mappings().all()
    return _with_times(pd.DataFrame([dict(row) for row in rows], columns=list(names)))


def _with_times(frame: pd.DataFrame) -> pd.DataFrame:
    for name in TIME_COLUMNS:
        if name in frame.columns:
            frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame


def runs(engine: Engine) -> pd.DataFrame:
    """One row per run, newest first: its state, rounds done, the nodes that took part and
    the latest global held-out loss."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        frame = _read(connection, schema, "runs", RUN_COLUMNS)
        done = _read(connection, schema, "rounds", ("run_id", "number", "held_out_loss"))
        taking_part = pd.concat(
            [
                _read(connection, schema, table, ("run_id", "node_name"), distinct=True)
                for table in ("node_metrics", "epsilon_reports", "rejected_updates")
            ]
        ).dropna()
    frame = frame.rename(columns={"id": "run_id"})
    frame["rounds_done"] = [int((done["run_id"] == run).sum()) for run in frame["run_id"]]
    frame["nodes"] = [
        sorted(set(taking_part.loc[taking_part["run_id"] == run, "node_name"]))
        for run in frame["run_id"]
    ]
    frame["held_out_loss"] = [_latest_loss(done, run) for run in frame["run_id"]]
    return frame.sort_values("started_at", ascending=False, ignore_index=True)


def _latest_loss(rounds_done: pd.DataFrame, run_id: str) -> float | None:
    known = rounds_done[(rounds_done["run_id"] == run_id) & rounds_done["held_out_loss"].notna()]
    if known.empty:
        return None
    return float(known.sort_values("number")["held_out_loss"].iloc[-1])


def rounds(engine: Engine, run_id: str) -> pd.DataFrame:
    """The rounds of ``run_id``, in order."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        return _read(
            connection,
            schema,
            "rounds",
            ROUND_COLUMNS,
            where=[("run_id", run_id)],
            order_by=["number"],
        )


def node_metrics(engine: Engine, run_id: str) -> pd.DataFrame:
    """Each node's figures of ``run_id``, long: round, phase, node_name, metric, value."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        frame = _read(
            connection,
            schema,
            "node_metrics",
            ("round", "phase", "node_name", "metrics"),
            where=[("run_id", run_id)],
            order_by=["round", "id"],
        )
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
    """Every epsilon report (of ``run_id``, or of all runs), oldest first, with the run's
    name and start time."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        frame = _read(
            connection,
            schema,
            "epsilon_reports",
            EPSILON_COLUMNS,
            where=[("run_id", run_id)],
            order_by=["id"],
        )
        started = _read(connection, schema, "runs", ("id", "name", "started_at"))
        caps = _ledger_caps(connection, schema)
    started = started.rename(columns={"id": "run_id", "name": "run_name"})
    frame = frame.merge(started, on="run_id", how="left")
    frame = frame.merge(caps, on=["node_name", "run_id", "round", "data_fingerprint"], how="left")
    frame["epsilon_cap"] = frame["epsilon_cap"].astype(float).fillna(frame["ledger_cap"])
    frame = frame.drop(columns="ledger_cap")
    return frame.sort_values(["started_at", "round"], kind="stable", ignore_index=True)


def _ledger_caps(connection: Connection, schema: Schema) -> pd.DataFrame:
    """The cap each signed ledger entry records, for reports stored without one (databases
    older than the reports' ``epsilon_cap`` column)."""
    names = ("node", "run_id", "round", "data_fingerprint", "entry")
    rows = _read(connection, schema, "ledger_entries", names)
    caps = [_json(text).get("epsilon_cap") for text in rows["entry"]]
    frame = rows.drop(columns="entry").rename(columns={"node": "node_name"})
    frame["ledger_cap"] = pd.Series(
        [float(cap) if isinstance(cap, int | float) else None for cap in caps], dtype=float
    )
    return frame.drop_duplicates(["node_name", "run_id", "round", "data_fingerprint"])


def rejected_updates(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Replies that were not aggregated (rejected, declined or failed), oldest first."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        return _read(
            connection,
            schema,
            "rejected_updates",
            REJECTION_COLUMNS,
            where=[("run_id", run_id)],
            order_by=["id"],
        )


def health_signals(engine: Engine, run_id: str) -> pd.DataFrame:
    """The health signals of ``run_id`` (node_name None: the global model)."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        return _read(
            connection,
            schema,
            "health_signals",
            SIGNAL_COLUMNS,
            where=[("run_id", run_id)],
            order_by=["round", "id"],
        )


def health_alerts(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Health alerts (of ``run_id``, or of all runs), newest first."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        frame = _read(
            connection,
            schema,
            "health_alerts",
            ALERT_COLUMNS,
            where=[("run_id", run_id)],
            order_by=["id"],
        )
    return frame.iloc[::-1].reset_index(drop=True)


def ab_tests(engine: Engine) -> pd.DataFrame:
    """A/B tests, newest first."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        frame = _read(connection, schema, "ab_tests", AB_TEST_COLUMNS)
    return frame.sort_values("started_at", ascending=False, ignore_index=True)


def ab_results(engine: Engine, test_id: str) -> pd.DataFrame:
    """The results of A/B test ``test_id``: one row per metric and scope (``overall`` or a
    node's name)."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        return _read(
            connection,
            schema,
            "ab_test_results",
            AB_RESULT_COLUMNS,
            where=[("test_id", test_id)],
            order_by=["id"],
        )


def latest_promotion(engine: Engine) -> dict[str, Any] | None:
    """The model version in production (the latest promotion), or None."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        frame = _read(
            connection, schema, "model_promotions", PROMOTION_COLUMNS, order_by=["promoted_at"]
        )
    return None if frame.empty else dict(frame.iloc[-1])


def ledger_copy_nodes(engine: Engine) -> list[str] | None:
    """Nodes with a ledger copy or an enrolled key in this database; None when it has no
    ledger tables (it predates the epsilon ledger)."""
    schema = read_schema(engine)
    if not schema.has("ledger_entries") or not schema.has("ledger_keys"):
        return None
    with transaction(engine) as session:
        with_keys = session.scalars(select(LedgerKeyRow.node).distinct())
        return sorted(set(ledger_nodes(session)) | set(with_keys))


def ledger_rows(engine: Engine, node: str) -> pd.DataFrame:
    """The ledger copy of ``node``, one row per entry in seq order, with the entry's fields
    (mode, steps, epsilon, cap, delta, accountant, recorded_at) spread into columns."""
    schema = read_schema(engine)
    with engine.connect() as connection:
        frame = _read(
            connection,
            schema,
            "ledger_entries",
            ("seq", "entry"),
            where=[("node", node)],
            order_by=["seq"],
        )
    fields = pd.json_normalize([_json(text) for text in frame["entry"]])
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
