"""The coordinator's database comes from Alembic migrations, on SQLite and on PostgreSQL: a new
database reaches the models' schema exactly, migrations go down and up again, a database made
by the old ``create_all`` code is adopted with every row, and times read back as aware UTC."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect, make_url, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError

from fedtune.common.database import transaction
from fedtune.platform.db.db_admin import db_upgrade
from fedtune.platform.db.migrations import SCRIPT_LOCATION, alembic_config, head_revision
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import (
    Base,
    DatabaseVersionError,
    NodeLevelEntry,
    Round,
    Run,
    current_revision,
    open_database,
    upgrade_database,
)
from fedtune.privacy.ledger import seal_entry, sign_checkpoint
from fedtune.privacy.ledger_store import (
    LedgerBase,
    add_public_key,
    append_entries,
    create_ledger_tables,
    ledger_entries,
)
from fedtune.privacy.signing import NodeKey

TABLES = sorted([*Base.metadata.tables, *LedgerBase.metadata.tables])
STARTED = datetime(2026, 11, 23, 19, 3, 38, 123456, tzinfo=UTC)


def drift(url: str) -> list[Any]:
    """What ``alembic check`` would report: the models against the database."""
    engine = open_database(url, create=False)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, [Base.metadata, LedgerBase.metadata])
    finally:
        engine.dispose()


@cache
def baseline() -> MetaData:
    """The schema of revision 0001 (= what fedtune made before migrations), as it froze it."""
    path = Path(SCRIPT_LOCATION) / "versions" / "0001_baseline.py"
    spec = importlib.util.spec_from_file_location("fedtune_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.metadata


def migrate(url: str, target: str, *, down: bool = False) -> None:
    """``alembic upgrade/downgrade TARGET`` on ``url``."""
    engine = open_database(url, create=False)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            if target == "base" or down:
                command.downgrade(config, target)
            else:
                command.upgrade(config, target)
    finally:
        engine.dispose()


def table_names(url: str) -> list[str]:
    engine = open_database(url, create=False)
    try:
        return sorted(set(inspect(engine).get_table_names()) - {"alembic_version"})
    finally:
        engine.dispose()


def contents(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table there, as the driver returns it, in id order."""
    present = set(inspect(engine).get_table_names()) - {"alembic_version"}
    with engine.connect() as connection:
        return {
            name: [
                dict(row)
                for row in connection.execute(text(f"SELECT * FROM {name} ORDER BY id")).mappings()
            ]
            for name in sorted(present)
        }


def fill(engine: Engine, *, epsilon_cap: bool = True) -> None:
    """A run with two rounds, its epsilon reports and one node's ledger copy."""
    key = NodeKey.generate()
    previous = None
    with transaction(engine) as session:
        session.add(
            Run(
                id="run-1",
                name="hospital and bank",
                status="finished",
                rounds_planned=2,
                base_model_spec="smollm2-135m",
                base_model_fingerprint="sha256:m",
                config={"rounds": 2},
                started_at=STARTED,
                finished_at=STARTED + timedelta(minutes=5),
            )
        )
        session.flush()
        add_public_key(session, "hospital", key.public_key_text())
        for number in (1, 2):
            session.add(
                Round(
                    run_id="run-1",
                    number=number,
                    nodes_sampled=2,
                    updates_accepted=2,
                    updates_rejected=0,
                    train_loss=2.5 / number,
                    held_out_loss=None,
                    seconds=12.5,
                )
            )
            report = {"epsilon_cap": 8.0} if epsilon_cap else {}
            session.execute(
                baseline()
                .tables["epsilon_reports"]
                .insert()
                .values(**old_epsilon_report(number), **report)
            )
            previous = seal_entry(ledger_fields(number), previous=previous, key=key)
            checkpoint = sign_checkpoint(node="hospital", head=previous, key=key)
            append_entries(session, [previous], checkpoint, contiguous=True)


def old_epsilon_report(number: int, run_id: str = "run-1") -> dict[str, Any]:
    """An epsilon_reports row as fedtune 0.1 stored it beside the signed entry."""
    return {
        "run_id": run_id,
        "round": number,
        "node_name": "hospital",
        "data_fingerprint": "sha256:d",
        "mode": "dp",
        "epsilon": 0.5 * number,
        "epsilon_round": 0.5,
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "max_grad_norm": 1.0,
        "steps": 3,
        "accountant": "opacus-rdp",
    }


def ledger_fields(number: int) -> dict[str, Any]:
    return {
        "node": "hospital",
        "run_id": "run-1",
        "round": number,
        "base_model_fingerprint": "sha256:m",
        "data_fingerprint": "sha256:d",
        "mode": "dp",
        "steps": 3,
        "sample_rate": 0.1,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "epsilon_round": 0.5,
        "epsilon_after": 0.5 * number,
        "epsilon_cap": 8.0,
        "accountant": "rdp",
        "accountant_version": "opacus-test",
        "kind": "training_round",
        "method": "dp-sgd",
        "privacy_unit": "example",
    }


def make_old_database(url: str, tables: list[str] | None = None) -> Engine:
    """A database as the code before migrations made it: ``create_all`` (of ``tables``, or
    all) and the ledger tables with their triggers, but no alembic_version table."""
    engine = open_database(url, create=False)
    names = tables or [n for n in baseline().tables if n not in LedgerBase.metadata.tables]
    baseline().create_all(engine, tables=[baseline().tables[name] for name in names])
    create_ledger_tables(engine)
    return engine


def test_a_new_database_is_migrated_to_head_and_matches_the_models(database_url):
    open_database(database_url).dispose()

    assert current_revision(database_url) == head_revision()
    assert table_names(database_url) == TABLES
    assert drift(database_url) == []


def test_drift_is_seen(database_url):
    """The drift check itself finds a difference (so the empty lists above mean something)."""
    engine = open_database(database_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE unsigned_epsilon_reports DROP COLUMN epsilon_cap"))
    engine.dispose()

    assert [d[0] for d in drift(database_url)] == ["add_column"]


def test_migrations_go_down_to_an_empty_database_and_up_again(database_url):
    upgrade_database(database_url)

    migrate(database_url, "base")
    assert table_names(database_url) == []
    assert current_revision(database_url) is None

    migrate(database_url, "head")
    assert current_revision(database_url) == head_revision()
    assert drift(database_url) == []


def test_a_database_made_before_migrations_is_upgraded_with_every_row(database_url):
    old = make_old_database(database_url)
    fill(old, epsilon_cap=False)
    with old.begin() as connection:  # the column came late: older databases lack it
        connection.execute(text("ALTER TABLE epsilon_reports DROP COLUMN epsilon_cap"))
    before = contents(old)
    old.dispose()
    assert current_revision(database_url) is None
    assert drift(database_url) != []

    assert upgrade_database(database_url) == head_revision()

    engine = open_database(database_url, create=False)
    after = contents(engine)
    after["epsilon_reports"] = after.pop("unsigned_epsilon_reports")  # 0004: renamed, every row
    assert after.pop("enrolled_nodes") == []  # 0002 made it: older code had no roster
    assert after.pop("node_costs") == after.pop("node_level_entries") == []  # 0006 made them
    assert after.pop("budget_groups") == []  # 0007 made it
    assert [row.pop("protections") for row in after["runs"]] == [None]  # 0006: not recorded
    assert [row.pop("epsilon_cap") for row in after["epsilon_reports"]] == [None, None]
    assert after == before
    assert [len(after[name]) for name in ("runs", "rounds", "ledger_entries")] == [1, 2, 2]
    with transaction(engine) as session:
        assert [e.epsilon_after for e in ledger_entries(session, "hospital")] == [0.5, 1.0]
        run = session.get(Run, "run-1")
        assert run is not None and run.started_at == STARTED
    assert drift(database_url) == []


def test_a_database_older_than_several_tables_gets_them(database_url):
    old = make_old_database(database_url, ["runs", "rounds", "node_metrics", "epsilon_reports"])
    old.dispose()

    open_database(database_url).dispose()

    assert table_names(database_url) == TABLES
    assert drift(database_url) == []


@pytest.mark.parametrize(
    "statement",
    ["UPDATE ledger_entries SET epsilon_after = 0.1", "DELETE FROM ledger_keys"],
)
def test_an_adopted_database_keeps_the_append_only_triggers(database_url, statement):
    old = make_old_database(database_url)
    fill(old)
    old.dispose()
    engine = open_database(database_url)

    with pytest.raises(DatabaseError, match="append-only"), transaction(engine) as session:
        session.execute(text(statement))


def test_a_database_newer_than_this_code_is_refused_naming_it(database_url):
    engine = open_database(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    shown = make_url(database_url).render_as_string(hide_password=True)

    with pytest.raises(DatabaseVersionError, match="revision '9999'") as refused:
        upgrade_database(database_url)
    assert shown in str(refused.value) and "newer fedtune" in str(refused.value)
    with pytest.raises(DatabaseVersionError):
        open_database(database_url)


def test_times_read_back_as_the_same_instant_in_utc(database_url):
    india = timezone(timedelta(hours=5, minutes=30))
    finished = datetime(2026, 11, 24, 1, 30, tzinfo=india)  # 2026-11-23 20:00 UTC
    with transaction(open_database(database_url)) as session:
        session.add(
            Run(
                id="run-1",
                name="r",
                status="finished",
                rounds_planned=1,
                base_model_spec="m",
                base_model_fingerprint="sha256:m",
                config={},
                started_at=STARTED,
                finished_at=finished,
            )
        )
    # PostgreSQL hands timestamptz back in the session's time zone: make it not UTC.
    reader = open_database(
        database_url
        + ("?options=-c%20timezone%3DAsia/Kolkata" if "postgresql" in database_url else ""),
        create=False,
    )

    with transaction(reader) as session:
        started_at, finished_at = session.execute(select(Run.started_at, Run.finished_at)).one()
        by_utc = select(Run.id).where(Run.finished_at == datetime(2026, 11, 23, 20, tzinfo=UTC))
        by_naive = select(Run.id).where(Run.finished_at == datetime(2026, 11, 23, 20))

        assert (started_at, finished_at) == (STARTED, finished)
        assert started_at.tzinfo is UTC and finished_at.tzinfo is UTC
        assert finished_at.hour == 20
        assert session.scalars(by_utc).all() == session.scalars(by_naive).all() == ["run-1"]


def test_db_upgrade_reports_what_it_did(database_url, capsys):
    assert db_upgrade(database_url) == 0
    assert db_upgrade(database_url) == 0

    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith(f"upgraded from no revision to {head_revision()} (newest)")
    assert second.endswith(f"already at {head_revision()} (newest)")


def test_one_privacy_record_keeps_every_unsigned_report_and_shows_it_only_without_a_signed_one(
    database_url,
):
    """Migration 0004: epsilon_reports rows are kept (renamed), the signed ledger copies are
    the record, and an old report is shown, marked unsigned, only for a round without one."""
    engine = open_database(database_url)
    engine.dispose()
    migrate(database_url, "0003", down=True)
    old = open_database(database_url, create=False)
    fill(old)  # rounds 1 and 2: a report and a signed copy each
    with old.begin() as connection:  # round 3: a report whose entry the coordinator refused
        connection.execute(
            baseline().tables["epsilon_reports"].insert().values(**old_epsilon_report(3))
        )
    before = contents(old)["epsilon_reports"]
    old.dispose()

    assert upgrade_database(database_url) == head_revision()

    engine = open_database(database_url, create=False)
    assert contents(engine)["unsigned_epsilon_reports"] == before
    with transaction(engine) as session:
        records = privacy_records(session, "run-1")
    assert [(r.round, r.signed, r.epsilon_after) for r in records] == [
        (1, True, 0.5),
        (2, True, 1.0),
        (3, False, 1.5),
    ]
    assert records[0].method == records[2].method == "dp-sgd"
    assert records[0].accountant == "rdp"  # the signed entry's vocabulary, not the report's
    engine.dispose()
    assert drift(database_url) == []

    migrate(database_url, "0003", down=True)
    downgraded = open_database(database_url, create=False)
    assert contents(downgraded)["epsilon_reports"] == before
    downgraded.dispose()


def fill_current(engine: Engine) -> None:
    """A run with two rounds and one node's signed ledger copy, in today's schema."""
    key = NodeKey.generate()
    with transaction(engine) as session:
        session.add(
            Run(
                id="run-1",
                name="hospital and bank",
                status="finished",
                rounds_planned=2,
                base_model_spec="smollm2-135m",
                base_model_fingerprint="sha256:m",
                config={"rounds": 2},
                started_at=STARTED,
            )
        )
        session.flush()
        add_public_key(session, "hospital", key.public_key_text())
        previous = None
        for number in (1, 2):
            session.add(
                Round(
                    run_id="run-1",
                    number=number,
                    nodes_sampled=2,
                    updates_accepted=2,
                    updates_rejected=0,
                    train_loss=2.5 / number,
                    held_out_loss=None,
                    seconds=12.5,
                )
            )
            previous = seal_entry(ledger_fields(number), previous=previous, key=key)
            checkpoint = sign_checkpoint(node="hospital", head=previous, key=key)
            append_entries(session, [previous], checkpoint, contiguous=True)


def node_level_row() -> NodeLevelEntry:
    return NodeLevelEntry(
        run_id="run-1",
        round=1,
        seq=1,
        epsilon_after=0.5,
        entry="{}",
        checkpoint="{}",
        public_key="k",
    )


@pytest.mark.parametrize(
    "statement",
    ["UPDATE node_level_entries SET epsilon_after = 0.1", "DELETE FROM node_level_entries"],
)
def test_the_copy_of_the_coordinators_node_level_ledger_is_append_only(database_url, statement):
    engine = open_database(database_url)
    fill_current(engine)
    with transaction(engine) as session:
        session.add(node_level_row())

    with pytest.raises(DatabaseError, match="append-only"), transaction(engine) as session:
        session.execute(text(statement))
    engine.dispose()


def test_costs_and_protections_go_down_and_up_keeping_the_runs(database_url):
    """Migration 0006 down (a run's rounds pointing at it) and up again: every older row stays."""
    engine = open_database(database_url)
    fill_current(engine)
    with transaction(engine) as session:
        run = session.get(Run, "run-1")
        assert run is not None
        run.protections = {"mode": "simulation"}
        session.add(node_level_row())
    before = contents(engine)
    engine.dispose()

    migrate(database_url, "0005", down=True)
    older = open_database(database_url, create=False)
    assert "node_costs" not in table_names(database_url)
    kept = contents(older)
    older.dispose()
    migrate(database_url, "head")

    assert kept["runs"] == [
        {k: v for k, v in row.items() if k != "protections"} for row in before["runs"]
    ]
    assert kept["rounds"] == before["rounds"] and kept["ledger_entries"] == before["ledger_entries"]
    assert drift(database_url) == []
