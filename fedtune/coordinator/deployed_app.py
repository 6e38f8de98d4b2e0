"""The coordinator's ServerApp in deployment: the SuperLink starts it for every run that
`fedtune run start` (or `fedtune run resume`) submits, with the run's job in the run config."""

from __future__ import annotations

from functools import partial

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.coordinator.deployment import run_deployed
from fedtune.coordinator.job import JOB_KEY, DeploymentJob

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    job = DeploymentJob.model_validate_json(str(context.run_config[JOB_KEY]))
    run_deployed(
        grid,
        context,
        job,
        flower_run_id=str(context.run_id),
        progress=partial(print, flush=True),
    )
