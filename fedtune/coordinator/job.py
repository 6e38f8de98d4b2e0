"""What `fedtune run start` / `fedtune run resume` hand the coordinator's ServerApp: carried in
the submitted Flower app's run config under :data:`JOB_KEY`, as JSON."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedtune.platform.config import RunConfig

JOB_KEY = "fedtune-job"


class DeploymentJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    run: RunConfig
    resume: bool = False
    # What the coordinator enforces for every run (TLS, node authentication...), recorded with
    # the run: fedtune.coordinator.run_protections.deployment_facts.
    coordinator: dict[str, Any] | None = None


def new_run_id() -> str:
    """A run id that sorts by start time: ``20261202T071736Z-874a9504``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
