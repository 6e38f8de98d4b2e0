"""`fedtune simulate`: a whole federated run on one machine through Flower's Simulation Engine.

This module wires the two sides together (the coordinator's ServerApp and the node's
ClientApp), which is why it sits beside ``cli.py`` and not inside either part. Each simulated
SuperNode is one ``[[nodes]]`` entry of the run config; Flower runs the ClientApps in Ray
worker processes and this process hosts the ServerApp. Nothing stays running afterwards:
Flower shuts Ray down at the end, and ``simulate`` then waits for (and if need be stops) every
process Ray started, including workers that outlive their raylet. On an existing Ray cluster
(``simulation.ray_address``) it starts no Ray process and stops none: the cluster is the
operator's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable

import psutil
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedtune.client_node.client_app import build_client_app
from fedtune.client_node.training_data import count_rows
from fedtune.common.database import transaction
from fedtune.common.errors import FedtuneError
from fedtune.coordinator.abtest import AbTestPlan, new_test_id, run_abtest
from fedtune.coordinator.job import new_run_id
from fedtune.coordinator.server_app import build_server_app
from fedtune.platform.config import NodeConfig, RunConfig
from fedtune.platform.db.storage import AbTest, Run, open_database
from fedtune.platform.runtime import simulation_engine
from fedtune.privacy.node_ledger import node_key


class SimulatedNodes:
    """Which node a simulated SuperNode plays: ``[[nodes]]`` entry number ``partition-id``."""

    def __init__(self, config: RunConfig):
        self.config = config

    def __call__(self, context: Context) -> NodeConfig:
        index = int(context.node_config["partition-id"])
        return self.config.node_config(self.config.nodes[index].name)


_PR_SET_CHILD_SUBREAPER = 36


def _adopt_orphans() -> None:
    """Make this process the parent of orphaned descendants (Linux), so Ray workers whose raylet
    exited first stay visible to :func:`_stop_descendants` instead of moving to init."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stop_descendants(*, grace_s: float = 15.0) -> None:
    """Wait for the processes this one started to exit; terminate, then kill, what remains."""
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for process in alive:
        process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=5)
    for process in alive:
        process.kill()


def enroll_nodes(config: RunConfig) -> dict[str, str]:
    """Each simulated node's public key: the configured one, else the key in its state_dir
    (created there if need be), as a node operator would hand it to the coordinator."""
    return {
        node.name: node.public_key
        or node_key(config.node_config(node.name).node.state_dir).public_key_text()
        for node in config.nodes
    }


class SimulationError(FedtuneError, RuntimeError):
    """The simulated run did not finish."""


class _KnownDeprecation(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated: fedtune knows (see
    DEVELOPERS.md), and a user can do nothing about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _run_simulation(config: RunConfig, server_app: ServerApp) -> None:
    """Run ``server_app`` against one simulated SuperNode per ``[[nodes]]`` entry."""
    cpus = os.cpu_count() or 1
    client_cpus = min(config.simulation.client_cpus or cpus, cpus)
    backend_config = {
        "client_resources": {
            "num_cpus": client_cpus,
            "num_gpus": 1.0 if torch.cuda.is_available() else 0.0,
        },
        "init_args": _ray_init_args(config, cpus),
    }
    if not torch.cuda.is_available():
        # Ray's future default; setting it silences its FutureWarning on every run.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    flower_logger.setLevel(logging.WARNING)  # fedtune prints its own progress
    deprecation = _KnownDeprecation()
    flower_logger.addFilter(deprecation)
    own_ray = config.simulation.ray_address is None  # else the cluster's processes are not ours
    if own_ray:
        _adopt_orphans()
    simulation_engine.install()  # its message poller, linear in the nodes (module says why)
    try:
        run_simulation(
            server_app=server_app,
            client_app=build_client_app(
                SimulatedNodes(config), cached_nodes=config.simulation.cached_nodes
            ),
            num_supernodes=len(config.nodes),
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    finally:
        flower_logger.setLevel(level)
        flower_logger.removeFilter(deprecation)
        if own_ray:
            _stop_descendants()


def _ray_init_args(config: RunConfig, cpus: int) -> dict[str, object]:
    """What Flower's Ray backend passes to ``ray.init``: the configured cluster, else a Ray
    instance of this run's own ("local": without it Ray joins the last cluster `ray start`
    left on this machine, whose CPUs it may not claim)."""
    if config.simulation.ray_address is not None:
        return {"address": config.simulation.ray_address, "include_dashboard": False}
    return {"address": "local", "num_cpus": cpus, "include_dashboard": False}


def simulate(
    config: RunConfig, *, run_id: str | None = None, progress: Callable[[str], None] = print
) -> str:
    """Run ``config`` to the end; returns the run id under which the database holds it."""
    run_id = run_id or new_run_id()
    examples = None
    if config.training.is_planned:  # "auto": planned for the smallest node
        examples = min(
            count_rows(node.train, method=config.training.method)
            for node in config.nodes
            if node.train is not None
        )
    _run_simulation(
        config,
        build_server_app(
            config,
            run_id=run_id,
            enrolled=enroll_nodes(config),
            examples=examples,
            progress=progress,
        ),
    )
    with transaction(open_database(config.database_url)) as session:
        run = session.get(Run, run_id)
        if run is None or run.status != "finished":
            detail = run.error if run is not None else "the run never started"
            raise SimulationError(f"run {run_id} did not finish: {detail}")
    return run_id


def simulate_abtest(
    config: RunConfig,
    plan: AbTestPlan,
    *,
    progress: Callable[[str], None] = print,
    on_reply: Callable[[Message], None] | None = None,
) -> str:
    """An A/B test on the simulated nodes of ``config``; returns the stored test's id."""
    engine = open_database(config.database_url)
    test_id = new_test_id()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_abtest(grid, engine, plan, test_id=test_id, progress=progress, on_reply=on_reply)

    _run_simulation(config, app)
    with transaction(engine) as session:
        test = session.get(AbTest, test_id)
        if test is None or test.status != "finished":
            detail = test.error if test is not None else "the test never started"
            raise SimulationError(f"A/B test {test_id} did not finish: {detail}")
    return test_id
