"""`fedtune abtest`: federated A/B tests between model versions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, get_args

from fedtune.platform.config import (
    AbMetric,
    ConfigError,
    load_run_config,
)


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    abtest = commands.add_parser(
        "abtest", help="federated A/B tests between model versions"
    ).add_subparsers(title="abtest commands")
    start = abtest.add_parser(
        "start", help="score two versions on every node's held-out data; paired tests"
    )
    start.add_argument("--config", required=True, type=Path, help="the run TOML (nodes, db)")
    start.add_argument("--a", required=True, help="version A (e.g. base)")
    start.add_argument("--b", required=True, help="version B (e.g. latest)")
    start.add_argument(
        "--metric",
        action="append",
        choices=get_args(AbMetric),
        help="repeat for several (default: loss and rouge-l); preference-accuracy and "
        "reward-margin score the nodes' held-out preference pairs, reward their held-out "
        "GRPO prompts (the greedy completion's summed reward under each node's "
        "training.grpo_rewards, 0 to the number of rewards)",
    )
    start.add_argument("--nodes", nargs="+", default=None, help="only these nodes' scores")
    start.add_argument("--alpha", type=float, default=0.05)
    start.add_argument("--max-examples", type=int, default=32, help="per node (default 32)")
    start.add_argument("--max-new-tokens", type=int, default=48, help="for ROUGE-L generation")
    start.add_argument(
        "--dpo-beta",
        type=float,
        default=None,
        help="beta of the implicit reward behind reward-margin (default: the run's "
        "training.dpo_beta)",
    )
    start.set_defaults(handler=_abtest_start)
    show = abtest.add_parser("show", help="print a stored A/B test")
    show.add_argument("test_id")
    show.add_argument("--db", required=True, help="coordinator database URL or SQLite file")
    show.set_defaults(handler=_abtest_show)


def _abtest_start(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.abtest import DEFAULT_METRICS, AbTestPlan, abtest_report, format_abtest
    from fedtune.coordinator.versions import resolve_version
    from fedtune.platform.db.storage import open_database
    from fedtune.simulation import simulate_abtest

    config = load_run_config(args.config)
    engine = open_database(database_url(config.database_url, must_exist=True))
    a, b = resolve_version(engine, args.a), resolve_version(engine, args.b)
    # At most one side is `base`: the base model is the one the other side adapts.
    fingerprint = a.base_model_fingerprint or b.base_model_fingerprint or ""
    try:
        plan = AbTestPlan(
            version_a=a,
            version_b=b,
            base_model_fingerprint=fingerprint,
            metrics=tuple(dict.fromkeys(args.metric or DEFAULT_METRICS)),
            alpha=args.alpha,
            max_examples=args.max_examples,
            max_new_tokens=args.max_new_tokens,
            dpo_beta=args.dpo_beta if args.dpo_beta is not None else config.training.dpo_beta,
            nodes=tuple(args.nodes) if args.nodes else None,
        )
    except ValueError as exc:
        raise ConfigError(f"abtest start: {exc}") from None
    test_id = simulate_abtest(config, plan)
    print(format_abtest(abtest_report(engine, test_id)))
    return 0


def _abtest_show(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.abtest import abtest_report, format_abtest
    from fedtune.platform.db.storage import open_database

    engine = open_database(database_url(args.db, must_exist=True), create=False)
    print(format_abtest(abtest_report(engine, args.test_id)))
    return 0
