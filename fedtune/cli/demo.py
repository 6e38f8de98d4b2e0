"""`fedtune demo` and `fedtune simulate`: federated runs on one machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedtune.cli.options import config_option
from fedtune.platform.config import (
    ConfigError,
    load_run_config,
)


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    demo = commands.add_parser(
        "demo",
        help="two nodes (a hospital and a bank) train the default model together with DP-LoRA",
    )
    demo.add_argument(
        "--workdir", type=Path, default=None, help="a new folder (default: runs/demo-<time>)"
    )
    demo.add_argument(
        "--rounds", type=int, default=None, help="federated rounds (default 3; GRPO: 2)"
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="DP steps per round (default 4; GRPO: 2)"
    )
    demo.add_argument(
        "--method",
        choices=["sft", "grpo"],
        default="sft",
        help="sft: supervised on the demo conversations; grpo: DP-GRPO on prompts with "
        "checkable answers (triage levels, fees) after a cold start, then the held-out reward",
    )
    demo.add_argument("--model", default="smollm2-135m", help="model spec")
    demo.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the nodes' base weights (model.dtype); auto: bfloat16 where the device computes "
        "it natively (faster; the adapter, clipping and noise stay float32), else float32",
    )
    demo.add_argument(
        "--deployment",
        action="store_true",
        help="real processes on 127.0.0.1: a coordinator and two nodes over TLS with node "
        "authentication and secure aggregation",
    )
    demo.set_defaults(handler=_demo)

    sim = commands.add_parser(
        "simulate", help="a federated run with any number of nodes (Flower Simulation Engine)"
    )
    config_option(sim, "run")
    sim.set_defaults(handler=_simulate)


def _demo(args: argparse.Namespace) -> int:
    from fedtune.demo.run import run_demo

    workdir: Path = args.workdir or Path("runs") / time.strftime("demo-%Y%m%dT%H%M%S")
    if args.method == "grpo":
        if args.deployment:
            raise ConfigError("the GRPO demo runs in simulation only (leave out --deployment)")
        from fedtune.demo.grpo_demo import run_grpo_demo

        run_grpo_demo(workdir, rounds=args.rounds or 2, steps=args.steps or 2, model=args.model)
        return 0
    args.rounds = args.rounds or 3
    args.steps = args.steps or 4
    if args.deployment:
        from fedtune.demo.local_deployment import run_deployment_demo

        run_deployment_demo(
            workdir, rounds=args.rounds, steps=args.steps, model=args.model, dtype=args.dtype
        )
        return 0
    run_demo(workdir, rounds=args.rounds, steps=args.steps, model=args.model, dtype=args.dtype)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_summary import format_summary, run_summary
    from fedtune.platform.db.storage import open_database
    from fedtune.simulation import simulate

    config = load_run_config(args.config)
    adapters = config.output.dir / "adapters"
    if adapters.exists() and any(adapters.iterdir()):
        raise ConfigError(
            f"{args.config}: output.dir {config.output.dir} already holds a run's "
            "adapters; choose a new output.dir"
        )
    run_id = simulate(config)
    print(format_summary(run_summary(open_database(config.database_url), run_id)))
    return 0
