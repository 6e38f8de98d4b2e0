"""A secure deployed round against a plain one of the same work, side by side in one run.

Runs the deployment demo (`fedtune demo --deployment`: coordinator, gateway and two nodes as
separate processes on 127.0.0.1, TLS, node authentication, DP-SGD on SmolLM2-135M) twice in
one invocation with the same figures: once with SecAgg+ and once with the updates in the clear.
Each mode gets its own folder, so its nodes start with fresh state and budget (a node's epsilon
spans runs, so the same nodes could not run both). The order alternates with ``--order``.

Per round it reads back from the coordinator's database the round's wall time and each node's
own handler time (``node-seconds``: DP-SGD training, accounting, ledger and local evaluation
for the train message; the global model's evaluation for the evaluate message). The slower
node's handler time per message is the round's node work; the rest (``coordination``) is
messaging through Flower and the gateway, SecAgg+'s extra exchanges, masking and unmasking,
validation, aggregation, checkpoints and database writes. DP-SGD's Poisson sampling varies the
node work from round to round, so besides the plain ratio of round times the result states
``ratio_at_equal_node_work``: the secure round's coordination put on the plain round's node
work, over the plain round. Round 1 loads the model and is reported apart.

    .venv/bin/python benchmarks/secure_vs_plain_deployment.py
    .venv/bin/python benchmarks/secure_vs_plain_deployment.py --order plain-first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from fedtune.common.database import transaction
from fedtune.demo.local_deployment import run_deployment_demo
from fedtune.platform.config import load_coordinator_config
from fedtune.platform.db.storage import NodeMetric, Round, open_database

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 1.3  # issue "Deployment speed and scale"


def round_times(workdir: Path, run_id: str) -> list[dict[str, Any]]:
    """Each round's wall time, the slower node's handler time per message and the rest."""
    config = load_coordinator_config(workdir / "coordinator.toml")
    with transaction(open_database(config.database_url)) as session:
        rounds = session.scalars(
            select(Round).where(Round.run_id == run_id).order_by(Round.number)
        ).all()
        metrics = session.scalars(select(NodeMetric).where(NodeMetric.run_id == run_id)).all()
        table = []
        for row in rounds:
            work = {
                phase: max(
                    (
                        float(m.metrics["node-seconds"])
                        for m in metrics
                        if m.round == row.number and m.phase == phase
                    ),
                    default=0.0,
                )
                for phase in ("train", "evaluate")
            }
            seconds = float(row.seconds or 0.0)
            table.append(
                {
                    "round": row.number,
                    "seconds": seconds,
                    "slowest_train_node_seconds": work["train"],
                    "slowest_evaluate_node_seconds": work["evaluate"],
                    "coordination_seconds": seconds - work["train"] - work["evaluate"],
                }
            )
    return table


def run_mode(root: Path, *, secure: bool, args: argparse.Namespace) -> dict[str, Any]:
    workdir = root / ("secure" if secure else "plain")
    started = time.perf_counter()
    summary = run_deployment_demo(
        workdir,
        rounds=args.rounds,
        steps=args.steps,
        model=args.model,
        dtype=args.dtype,
        secure=secure,
        progress=lambda line: print(f"[{workdir.name}] {line}", flush=True),
    )
    wall = time.perf_counter() - started
    rounds = round_times(workdir, summary["run"]["id"])
    steady = rounds[1:]
    return {
        "wall_seconds_including_setup": wall,
        "rounds": rounds,
        "median_round_seconds": statistics.median(r["seconds"] for r in steady),
        "median_coordination_seconds": statistics.median(r["coordination_seconds"] for r in steady),
        "median_node_work_seconds": statistics.median(
            r["slowest_train_node_seconds"] + r["slowest_evaluate_node_seconds"] for r in steady
        ),
        "final_global_perplexity": {
            node: figures["final_global_perplexity"] for node, figures in summary["nodes"].items()
        },
        "protections": sorted(summary["deployment"]["protections"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="round 1 is reported apart")
    parser.add_argument("--steps", type=int, default=4, help="DP-SGD steps per round")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--order", default="secure-first", choices=("secure-first", "plain-first"))
    parser.add_argument("--workdir", type=Path, help="keep the two deployments here")
    parser.add_argument("--out", type=Path, default=RESULTS / "secure_vs_plain_deployment.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 loads the model)")

    invocation: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("workdir", "out")},
    }
    modes = (True, False) if args.order == "secure-first" else (False, True)
    with tempfile.TemporaryDirectory(prefix="fedtune-secure-vs-plain-") as scratch:
        root = args.workdir or Path(scratch)
        results = {
            ("secure" if secure else "plain"): run_mode(root, secure=secure, args=args)
            for secure in modes
        }
    invocation["load_average_at_end"] = list(os.getloadavg())
    secure, plain = results["secure"], results["plain"]
    equal_work = (
        plain["median_round_seconds"]
        + secure["median_coordination_seconds"]
        - plain["median_coordination_seconds"]
    )
    comparison = {
        "ratio": secure["median_round_seconds"] / plain["median_round_seconds"],
        "ratio_at_equal_node_work": equal_work / plain["median_round_seconds"],
        "extra_coordination_seconds": secure["median_coordination_seconds"]
        - plain["median_coordination_seconds"],
    }
    comparison["target_met"] = comparison["ratio_at_equal_node_work"] <= TARGET_RATIO
    key = f"{args.model}/{args.dtype}/{args.rounds}x{args.steps}/{args.order}"
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update(
        benchmark="secure_vs_plain_deployment",
        target_ratio=TARGET_RATIO,
        what_is_measured=" ".join(__doc__.split("\n\n")[1:3]).replace("\n", " "),
    )
    report.setdefault("cells", {})[key] = {
        **comparison,
        **results,
        "invocation": invocation,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({key: comparison}, indent=2))


if __name__ == "__main__":
    main()
