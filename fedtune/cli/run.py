"""`fedtune run`: runs on the deployed nodes."""

from __future__ import annotations

import argparse
import json
import subprocess
from typing import Any

from fedtune.cli.options import config_option, coordinator_option
from fedtune.platform.config import (
    load_coordinator_config,
    load_run_config,
)


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    run = commands.add_parser("run", help="runs on the deployed nodes").add_subparsers(
        title="run commands"
    )
    run_start = run.add_parser("start", help="submit a training run to the coordinator")
    config_option(run_start, "run")
    coordinator_option(run_start)
    run_start.set_defaults(handler=_run_start)
    status = run.add_parser("status", help="runs and their progress (newest first)")
    status.add_argument("run_id", nargs="?", default=None)
    coordinator_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_run_status)
    logs = run.add_parser("logs", help="the coordinator's log of a run")
    logs.add_argument("run_id")
    coordinator_option(logs)
    logs.add_argument("--follow", action="store_true", help="stream until the run ends")
    logs.set_defaults(handler=_run_logs)
    resume = run.add_parser("resume", help="continue an interrupted run after its last round")
    resume.add_argument("run_id")
    coordinator_option(resume)
    resume.set_defaults(handler=_run_resume)


def _run_start(args: argparse.Namespace) -> int:
    from fedtune.coordinator.job import new_run_id
    from fedtune.coordinator.superlink import deployment_job, submit_run

    coordinator = load_coordinator_config(args.coordinator)
    job = deployment_job(coordinator, load_run_config(args.config), run_id=new_run_id())
    flower_run = submit_run(coordinator, job)
    print(f"started run {job.run_id} (Flower run {flower_run})")
    print(f"follow it: fedtune run logs {job.run_id} --coordinator {args.coordinator} --follow")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_registry import run_statuses

    coordinator = load_coordinator_config(args.coordinator)
    statuses = run_statuses(coordinator, run_id=args.run_id)
    if args.json:
        print(json.dumps(statuses, indent=2, default=str))
        return 0
    if not statuses:
        print("no runs yet")
    for status in statuses:
        print(
            f"{status['run_id']}  {status['status']:<9} round {status['rounds_done']}/"
            f"{status['rounds_planned']}  started {status['started_at']}"
            + (f"  error: {status['error']}" if status["error"] else "")
        )
    return 0


def _run_logs(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_registry import flower_run_id
    from fedtune.coordinator.superlink import CONNECTION, flower_environment, flwr
    from fedtune.platform.runtime.flower_tools import flower_command

    coordinator = load_coordinator_config(args.coordinator)
    flower_id = flower_run_id(coordinator, args.run_id)
    if args.follow:  # Flower streams to this terminal until the run ends
        return subprocess.call(
            [flower_command("flwr"), "log", flower_id, CONNECTION, "--stream"],
            env=flower_environment(coordinator),
        )
    print(flwr(coordinator, "log", flower_id, CONNECTION, "--show"), end="")
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_registry import stored_run_config
    from fedtune.coordinator.superlink import deployment_job, submit_run

    coordinator = load_coordinator_config(args.coordinator)
    run = stored_run_config(coordinator, args.run_id)
    job = deployment_job(coordinator, run, run_id=args.run_id, resume=True)
    flower_run = submit_run(coordinator, job)
    print(f"resuming run {args.run_id} (Flower run {flower_run})")
    return 0
