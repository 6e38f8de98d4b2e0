"""`fedtune privacy`: plan a node's privacy budget before training."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.privacy.planner import Plan


# Measured: a DP step of 64 examples x 128 tokens takes about 21 s with SmolLM2-135M on this
# project's 2-core CI machine (benchmarks/results/dp_utility_study.json), 0.20 s on an H200
# (gpu_check.json).
CPU_SECONDS_PER_EXAMPLE = 0.33


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    privacy = commands.add_parser(
        "privacy", help="plan a node's privacy budget (batch, steps, noise, epsilon per round)"
    ).add_subparsers(title="privacy commands")
    plan = privacy.add_parser(
        "plan",
        help="the logical batch, steps per round, noise multiplier, learning rate and epsilon "
        "after each round for N examples and a target epsilon; writes nothing unless --write",
    )
    plan.add_argument("--examples", type=int, help="training examples N (default: --config's)")
    plan.add_argument("--epsilon", type=float, help="target epsilon (default: --config's)")
    plan.add_argument("--delta", type=float, help="delta (default: --config's, else 1e-5)")
    plan.add_argument("--rounds", type=int, help="rounds (default: --config's planned_rounds, 1)")
    plan.add_argument("--epochs", type=float, default=None, help="passes over the data (3)")
    plan.add_argument("--batch-size", type=int, help="logical batch (default: planned from N)")
    plan.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="training time the plan must fit in (fewer passes over the data if needed)",
    )
    plan.add_argument(
        "--seconds-per-example",
        type=float,
        default=CPU_SECONDS_PER_EXAMPLE,
        help="one example's DP gradient on this machine, for --time-budget (default "
        f"{CPU_SECONDS_PER_EXAMPLE}: SmolLM2-135M on 2 CPU cores; an H200: 0.0032)",
    )
    plan.add_argument(
        "--config",
        type=Path,
        help="a node.toml: N from its training data, epsilon, delta and rounds from its "
        "[privacy]; the data set's earlier spending from its ledger",
    )
    plan.add_argument(
        "--write",
        action="store_true",
        help="with --config: write the node config with the plan's choices as NAME.planned.toml "
        "beside it (never overwrites; the original stays as it is)",
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(handler=_privacy_plan)


def _privacy_plan(args: argparse.Namespace) -> int:
    from fedtune.privacy.accounting import AccountantName, HistoryEntry
    from fedtune.privacy.planner import DEFAULT_EPOCHS, PlanError, format_plan, make_plan

    examples, epsilon, delta, rounds = args.examples, args.epsilon, args.delta, args.rounds
    accountant: AccountantName = "rdp"
    history: list[HistoryEntry] = []
    if args.config is not None:
        from fedtune.client_node.training_data import budget_group_fingerprints, count_rows
        from fedtune.platform.config import load_node_config
        from fedtune.platform.model.fingerprint import file_fingerprint
        from fedtune.privacy.node_ledger import LEDGER_FILE, NodeLedger

        config = load_node_config(args.config)
        if examples is None:
            examples = count_rows(config.data.train, method=config.training.method)
        epsilon = config.privacy.target_epsilon if epsilon is None else epsilon
        delta = config.privacy.delta if delta is None else delta
        rounds = config.privacy.planned_rounds if rounds is None else rounds
        accountant = config.privacy.accountant
        if (config.node.state_dir / LEDGER_FILE).is_file():  # reading never creates one
            ledger = NodeLedger(config.node.state_dir, node=config.node.name)
            history = ledger.group_dp_history(
                [
                    file_fingerprint(config.data.train),
                    *budget_group_fingerprints(config.data.shares_budget_with),
                ]
            )
    if examples is None or epsilon is None:
        raise PlanError("give --examples and --epsilon, or --config node.toml")
    if args.write and args.config is None:
        raise PlanError("--write needs --config node.toml (it writes the planned config beside it)")
    result = make_plan(
        examples,
        epsilon=epsilon,
        delta=delta if delta is not None else 1e-5,
        rounds=1 if rounds is None else rounds,
        epochs=args.epochs if args.epochs is not None else DEFAULT_EPOCHS,
        batch_size=args.batch_size,
        accountant=accountant,
        history=history,
        time_budget_s=None if args.time_budget is None else 60.0 * args.time_budget,
        seconds_per_example=args.seconds_per_example,
    )
    written = _write_planned_config(args.config, result) if args.write else None
    if args.json:
        summary = {**asdict(result), "total_steps": result.total_steps}
        print(json.dumps({**summary, "written": str(written) if written else None}, indent=2))
    else:
        if history:
            print(f"the data set has already spent {len(history)} private rounds (counted)")
        print(format_plan(result))
        if written:
            print(f"wrote {written} (the plan's batch, steps, learning rate and clip norm)")
    return 0


def _write_planned_config(config: Path, plan: Plan) -> Path:
    """``config`` with the plan's choices, as ``NAME.planned.toml`` beside it, checked by
    loading it back; never overwrites a file."""
    import tomllib

    import tomli_w

    from fedtune.platform.config import load_node_config
    from fedtune.privacy.planner import PlanError

    target = config.with_name(f"{config.stem}.planned.toml")
    document = tomllib.loads(config.read_text(encoding="utf-8"))
    training = document.setdefault("training", {})
    physical = training.get("physical_batch_size", 8)
    training.update(
        steps=plan.steps_per_round,
        batch_size=plan.batch_size,
        physical_batch_size=min(physical, plan.batch_size),
        learning_rate=plan.learning_rate,
    )
    document.setdefault("privacy", {})["max_grad_norm"] = plan.max_grad_norm
    try:
        with target.open("x", encoding="utf-8") as out:  # "x": an existing file stays
            out.write(tomli_w.dumps(document))
    except FileExistsError:
        raise PlanError(f"--write: {target} exists; remove it first (nothing written)") from None
    try:
        load_node_config(target)
    except Exception:
        target.unlink()
        raise
    return target
