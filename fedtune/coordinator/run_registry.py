"""What `fedtune run status|logs|resume` read: the runs in the coordinator's database and the
submissions in its state folder (a run that failed before its ServerApp registered it is
known only there)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from fedtune.common.database import database_url, transaction
from fedtune.coordinator.superlink import SUBMISSION_FILE, CoordinatorError
from fedtune.platform.config import CoordinatorConfig, RunConfig
from fedtune.platform.db.storage import Round, Run, open_database


def _submissions(config: CoordinatorConfig) -> list[dict[str, Any]]:
    found = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in (config.coordinator.state_dir / "apps").glob(f"*/{SUBMISSION_FILE}")
    ]
    return sorted(found, key=lambda s: str(s["submitted_at"]))


def flower_run_id(config: CoordinatorConfig, run_id: str) -> str:
    """The Flower run of ``run_id``'s latest submission (a resume is a new Flower run)."""
    matching = [s for s in _submissions(config) if s["run_id"] == run_id]
    if not matching:
        raise CoordinatorError(f"no run {run_id} was submitted to this coordinator")
    return str(matching[-1]["flower_run_id"])


def run_statuses(config: CoordinatorConfig, *, run_id: str | None = None) -> list[dict[str, Any]]:
    """Every run (or ``run_id``), newest first: status, rounds done, error."""
    with transaction(_existing_database(config)) as session:
        query = select(Run).order_by(Run.started_at.desc())
        if run_id is not None:
            query = query.where(Run.id == run_id)
        done = dict(
            session.execute(select(Round.run_id, func.count()).group_by(Round.run_id)).all()
        )
        statuses = [
            {
                "run_id": run.id,
                "name": run.name,
                "status": run.status,
                "rounds_done": done.get(run.id, 0),
                "rounds_planned": run.rounds_planned,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "error": run.error,
            }
            for run in session.scalars(query)
        ]
    known = {s["run_id"] for s in statuses}
    for submission in reversed(_submissions(config)):
        if submission["run_id"] in known or (run_id is not None and submission["run_id"] != run_id):
            continue
        known.add(submission["run_id"])
        statuses.append(
            {
                "run_id": submission["run_id"],
                "name": None,
                "status": "submitted",
                "rounds_done": 0,
                "rounds_planned": None,
                "started_at": submission["submitted_at"],
                "finished_at": None,
                "error": "not started yet, or failed before it began: see `fedtune run logs`",
            }
        )
    return statuses


def stored_run_config(config: CoordinatorConfig, run_id: str) -> RunConfig:
    """The configuration ``run_id`` was started with, to resume it."""
    with transaction(_existing_database(config)) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise CoordinatorError(f"no run {run_id} in {config.database_url}")
        if run.status == "finished":
            raise CoordinatorError(f"run {run_id} has finished; there is nothing to resume")
        return RunConfig.model_validate(run.config)


def _existing_database(config: CoordinatorConfig) -> Engine:
    """The coordinator's database, which `fedtune coordinator start` made; reading never
    creates one."""
    return open_database(database_url(config.database_url, must_exist=True), create=False)
