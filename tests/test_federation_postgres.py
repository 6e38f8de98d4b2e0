"""A federated run (Flower's Simulation Engine) whose coordinator stores everything in
PostgreSQL: the run, its rounds, the nodes' metrics and signed ledger copies."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from conftest import PlannedPostgresRun
from fedtune.common.database import transaction
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import Round, Run, open_database
from fedtune.privacy.ledger_store import ledger_entries

pytestmark = pytest.mark.simulation


def test_a_simulated_run_is_recorded_in_postgresql(planned_postgres_run: PlannedPostgresRun):
    """The run is shared with test_planner.py (its training is planned: "auto")."""
    config, run_id = planned_postgres_run.config, planned_postgres_run.run_id

    assert config.database_url.startswith("postgresql+psycopg://")
    with transaction(open_database(config.database_url)) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.status == "finished"
        assert run.started_at.tzinfo is not None  # stored and read back as UTC
        rounds = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        assert [(r.number, r.updates_accepted) for r in rounds] == [(1, 2), (2, 2)]
        records = privacy_records(session, run_id)
        assert sorted(r.node for r in records) == ["bank", "bank", "hospital", "hospital"]
        for node in ("hospital", "bank"):
            assert [e.round for e in ledger_entries(session, node)] == [1, 2]
