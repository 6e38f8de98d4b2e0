"""What `fedtune run start` / `fedtune run resume` hand the coordinator's ServerApp: carried in
the submitted Flower app's run config under :data:`JOB_KEY`, as JSON."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from fedtune.platform.config import RunConfig

JOB_KEY = "fedtune-job"


class DeploymentJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    run: RunConfig
    resume: bool = False
