"""A run's outcome, read back from the coordinator's database: per node, the held-out
perplexity of the base model, of the node's first-round model and of the final global model,
and the epsilon it spent; per round, the global adapter checkpoint."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import (
    AdapterCheckpoint,
    NodeMetric,
    RejectedUpdate,
    Round,
    Run,
)


def _perplexity(loss: float | None) -> float | None:
    return math.exp(min(loss, 50.0)) if loss is not None else None


def run_summary(engine: Engine, run_id: str) -> dict[str, Any]:
    """Everything the demo prints and writes to ``summary.json``, from the database alone."""
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r} in the database")
        metrics = session.scalars(
            select(NodeMetric).where(NodeMetric.run_id == run_id).order_by(NodeMetric.round)
        ).all()
        records = privacy_records(session, run_id)
        rounds = session.scalars(
            select(Round).where(Round.run_id == run_id).order_by(Round.number)
        ).all()
        checkpoints = {
            c.round: c
            for c in session.scalars(
                select(AdapterCheckpoint).where(AdapterCheckpoint.run_id == run_id)
            )
        }
        rejected = session.scalars(
            select(RejectedUpdate).where(RejectedUpdate.run_id == run_id)
        ).all()
        nodes: dict[str, dict[str, Any]] = {}
        for metric in metrics:
            node = nodes.setdefault(metric.node_name, {})
            figures = metric.metrics
            if metric.phase == "train":
                if figures.get("held-out-loss-start") is not None:
                    node["base_perplexity"] = _perplexity(figures["held-out-loss-start"])
                if "first_round_perplexity" not in node and figures.get("held-out-loss-local"):
                    node["first_round"] = metric.round
                    node["first_round_perplexity"] = _perplexity(figures["held-out-loss-local"])
            elif figures.get("held-out-loss") is not None:
                node["final_global_perplexity"] = _perplexity(figures["held-out-loss"])
                node["final_global_round"] = metric.round
        for record in records:  # by round: the last one stays
            node = nodes.setdefault(record.node, {})
            node.update(
                privacy=record.mode,
                method=record.method,
                epsilon_after=record.epsilon_after,
                delta=record.delta,
                accountant=record.accountant,
                noise_multiplier=record.noise_multiplier,
                signed=record.signed,
            )
        return {
            "run": {
                "id": run.id,
                "name": run.name,
                "status": run.status,
                "rounds_planned": run.rounds_planned,
                "base_model": run.base_model_spec,
                "base_model_fingerprint": run.base_model_fingerprint,
            },
            "nodes": nodes,
            "rounds": [
                {
                    "round": r.number,
                    "updates_accepted": r.updates_accepted,
                    "updates_not_aggregated": r.updates_rejected,
                    "train_loss": r.train_loss,
                    "global_held_out_loss": r.held_out_loss,
                    "seconds": r.seconds,
                    "adapter": checkpoints[r.number].path if r.number in checkpoints else None,
                    "adapter_sha256": (
                        checkpoints[r.number].sha256 if r.number in checkpoints else None
                    ),
                }
                for r in rounds
            ],
            "not_aggregated": [
                {
                    "round": r.round,
                    "phase": r.phase,
                    "node": r.node_name,
                    "kind": r.kind,
                    "reason": r.reason,
                }
                for r in rejected
            ],
        }


def format_summary(summary: dict[str, Any]) -> str:
    """The per-node table the demo and `fedtune simulate` print."""

    def number(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"run {summary['run']['id']} ({summary['run']['status']}), held-out perplexity per node:",
        f"{'node':<16} {'base model':>11} {'own round 1':>12} {'final global':>13} "
        f"{'epsilon':>8} {'delta':>7}  accountant",
    ]
    for name, node in sorted(summary["nodes"].items()):
        if node.get("privacy") == "non-private":
            epsilon, delta, accountant = "NON-PRIVATE", "-", "-"
        else:
            epsilon = number(node.get("epsilon_after"))
            delta = f"{node['delta']:g}" if node.get("delta") else "-"
            accountant = node.get("accountant") or "-"
        lines.append(
            f"{name:<16} {number(node.get('base_perplexity')):>11} "
            f"{number(node.get('first_round_perplexity')):>12} "
            f"{number(node.get('final_global_perplexity')):>13} {epsilon:>8} {delta:>7}  "
            f"{accountant}"
        )
    return "\n".join(lines)
