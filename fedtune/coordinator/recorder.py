"""Records each round of a run in the coordinator's database and checkpoints the global
adapter. A round's writes (its row, the nodes' metrics, the copies of their signed ledger
entries — the round's only privacy record — with the coordinator's receipt for each, the
rejected updates and the checkpoint row) commit together once its evaluation is in. Each
node gets its receipt in the round's evaluate message (:meth:`RunRecorder.receipt_for`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import AdapterCheckpointer
from fedtune.coordinator.health import (
    Alert,
    Signal,
    budget_alerts,
    loss_alerts,
    rejection_alerts,
    update_signals,
)
from fedtune.coordinator.strategy import ReplyOutcome
from fedtune.platform.db.storage import (
    AdapterCheckpoint,
    HealthAlert,
    HealthSignal,
    NodeMetric,
    RejectedUpdate,
    Round,
)
from fedtune.platform.wire.messages import (
    ARRAYS,
    BUDGET,
    METRICS,
    NUM_EXAMPLES,
    record_to_arrays,
)
from fedtune.privacy.ledger_store import checkpoint_row, entry_row, receipt_row
from fedtune.privacy.receipts import Receipt, witness_of
from fedtune.privacy.signing import NodeKey


def _planned_epsilon(content: RecordDict | None) -> float | None:
    """The epsilon a node's plan expected by this round, as its budget record states it."""
    if content is None or BUDGET not in content.config_records:
        return None
    return _finite(content.config_records[BUDGET].get("planned_epsilon"))


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class _PendingRound:
    started: float
    rows: list[Any] = field(default_factory=list)
    sampled: int = 0
    accepted: int = 0
    rejected: int = 0
    train_loss: float | None = None


class RunRecorder:
    """The strategy's :class:`~fedtune.coordinator.strategy.RoundObserver` for one run."""

    def __init__(
        self,
        engine: Engine,
        *,
        run_id: str,
        rounds: int,
        checkpointer: AdapterCheckpointer,
        witness: NodeKey,
        progress: Callable[[str], None] = print,
    ):
        self.engine = engine
        self.run_id = run_id
        self.rounds = rounds
        self.checkpointer = checkpointer
        self.progress = progress
        self.witness = witness
        self._receipts: dict[str, Receipt] = {}  # Flower node id -> its latest receipt
        # Flower node id -> the name its replies were attributed to (in deployment the
        # enrolled name, see coordinator.roster; in simulation the name the node gave)
        self.node_names: dict[str, str] = {}
        self._pending: _PendingRound | None = None
        self._held_out: list[float | None] = []  # global held-out loss per round
        self._round_started = time.perf_counter()

    def _ledger_rows(self, outcomes: list[ReplyOutcome]) -> list[Any]:
        """Each verified ledger entry (kept even when its update was rejected: the epsilon
        was spent), the node's signed head, and the coordinator's receipt for it."""
        rows: list[Any] = []
        for outcome in outcomes:
            if outcome.ledger is not None:
                receipt = witness_of(outcome.ledger.entry, self.witness)
                self._receipts[outcome.flower_node_id] = receipt
                rows += [
                    entry_row(outcome.ledger.entry),
                    checkpoint_row(outcome.ledger.checkpoint),
                    receipt_row(receipt),
                ]
        return rows

    def receipt_for(self, flower_node_id: str) -> Receipt | None:
        """The receipt for the latest ledger head this run received from the node."""
        return self._receipts.get(flower_node_id)

    def _name(self, outcome: ReplyOutcome) -> str | None:
        if outcome.node_name:
            self.node_names[outcome.flower_node_id] = outcome.node_name
        return outcome.node_name or self.node_names.get(outcome.flower_node_id)

    def _rejections(self, server_round: int, phase: str, outcomes: list[ReplyOutcome]) -> list[Any]:
        return [
            RejectedUpdate(
                run_id=self.run_id,
                round=server_round,
                phase=phase,
                node_name=self._name(o),
                flower_node_id=o.flower_node_id,
                kind=o.kind,
                reason=o.reason or "",
            )
            for o in outcomes
            if o.kind != "accepted"
        ]

    def on_train(
        self,
        server_round: int,
        outcomes: list[ReplyOutcome],
        aggregate: ArrayRecord | None,
        metrics: MetricRecord | None,
        sent: ArrayRecord,
    ) -> None:
        pending = _PendingRound(started=self._round_started, sampled=len(outcomes))
        pending.rows += self._train_health(server_round, outcomes, aggregate, metrics, sent)
        pending.rows += self._rejections(server_round, "train", outcomes)
        pending.rows += self._ledger_rows(outcomes)
        for outcome in outcomes:
            content = outcome.content
            if content is None:
                continue
            name = self._name(outcome) or f"node-{outcome.flower_node_id}"
            node_metrics = dict(content.metric_records[METRICS])
            pending.rows.append(
                NodeMetric(
                    run_id=self.run_id,
                    round=server_round,
                    phase="train",
                    node_name=name,
                    flower_node_id=outcome.flower_node_id,
                    num_examples=int(cast(int, node_metrics[NUM_EXAMPLES])),
                    metrics={k: _finite(v) for k, v in node_metrics.items()},
                )
            )
        pending.accepted = sum(o.kind == "accepted" for o in outcomes)
        pending.rejected = len(outcomes) - pending.accepted
        if metrics is not None:
            pending.train_loss = _finite(metrics.get("train-loss"))
        if aggregate is not None:
            path, sha = self.checkpointer.save(server_round, record_to_arrays(aggregate))
            pending.rows.append(
                AdapterCheckpoint(
                    run_id=self.run_id, round=server_round, path=str(path), sha256=sha
                )
            )
        self._pending = pending
        declined = [
            f"{self._name(o)}: {o.kind} ({o.reason})" for o in outcomes if o.kind != "accepted"
        ]
        self.progress(
            f"round {server_round}/{self.rounds}: aggregated {pending.accepted} of "
            f"{pending.sampled} updates"
            + (f", train loss {pending.train_loss:.3f}" if pending.train_loss is not None else "")
            + "".join(f"\n  not aggregated: {line}" for line in declined)
        )

    def _train_health(
        self,
        server_round: int,
        outcomes: list[ReplyOutcome],
        aggregate: ArrayRecord | None,
        metrics: MetricRecord | None,
        sent: ArrayRecord,
    ) -> list[Any]:
        accepted = {
            self._name(o) or f"node-{o.flower_node_id}": o.content
            for o in outcomes
            if o.content is not None
        }
        signals, alerts = update_signals(
            record_to_arrays(sent),
            {  # under secure aggregation no single update is known
                name: record_to_arrays(c.array_records[ARRAYS])
                for name, c in accepted.items()
                if ARRAYS in c.array_records
            },
            record_to_arrays(aggregate) if aggregate is not None else None,
        )
        for name, content in accepted.items():
            loss = content.metric_records[METRICS].get("train-loss")
            signals.append(Signal("train-loss", name, _finite(loss)))
        share = sum(o.kind == "accepted" for o in outcomes) / len(outcomes) if outcomes else None
        signals.append(Signal("participation", None, share))
        train_loss = _finite(metrics.get("train-loss")) if metrics is not None else None
        signals.append(Signal("train-loss", None, train_loss))
        alerts += rejection_alerts(
            [(self._name(o), o.kind, o.reason or "") for o in outcomes if o.kind != "accepted"]
        )
        spent = {}
        for o in outcomes:
            privacy = o.ledger.entry if o.ledger is not None else None
            if privacy is not None and privacy.mode == "dp":
                spent[privacy.node] = (
                    privacy.epsilon_after,
                    privacy.epsilon_cap,
                    _planned_epsilon(o.content),
                )
        alerts += budget_alerts(spent)
        return self._health_rows(server_round, signals, alerts)

    def _health_rows(
        self, server_round: int, signals: list[Signal], alerts: list[Alert]
    ) -> list[Any]:
        rows: list[Any] = [
            HealthSignal(
                run_id=self.run_id,
                round=server_round,
                node_name=s.node_name,
                signal=s.signal,
                value=s.value,
                unavailable=s.unavailable,
            )
            for s in signals
        ]
        rows += [
            HealthAlert(
                run_id=self.run_id,
                round=server_round,
                node_name=a.node_name,
                kind=a.kind,
                message=a.message,
            )
            for a in alerts
        ]
        for alert in alerts:
            self.progress(f"  alert ({alert.kind}): {alert.message}")
        return rows

    def on_evaluate(
        self, server_round: int, outcomes: list[ReplyOutcome], metrics: MetricRecord | None
    ) -> None:
        pending = self._pending or _PendingRound(started=self._round_started)
        self._pending = None
        rows = pending.rows + self._rejections(server_round, "evaluate", outcomes)
        rows += self._ledger_rows(outcomes)  # metrics released under DP
        for outcome in outcomes:
            if outcome.content is None:
                continue
            node_metrics = dict(outcome.content.metric_records[METRICS])
            rows.append(
                NodeMetric(
                    run_id=self.run_id,
                    round=server_round,
                    phase="evaluate",
                    node_name=self._name(outcome) or f"node-{outcome.flower_node_id}",
                    flower_node_id=outcome.flower_node_id,
                    num_examples=int(cast(int, node_metrics.get(NUM_EXAMPLES, 0))),
                    metrics={k: _finite(v) for k, v in node_metrics.items()},
                )
            )
        held_out = _finite(metrics.get("held-out-loss")) if metrics is not None else None
        self._held_out.append(held_out)
        signals = [Signal("held-out-loss", None, held_out)] + [
            Signal(
                "held-out-loss",
                self._name(o) or f"node-{o.flower_node_id}",
                _finite(o.content.metric_records[METRICS].get("held-out-loss")),
            )
            for o in outcomes
            if o.content is not None
        ]
        rows += self._health_rows(server_round, signals, loss_alerts(self._held_out))
        seconds = time.perf_counter() - pending.started
        rows.append(
            Round(
                run_id=self.run_id,
                number=server_round,
                nodes_sampled=pending.sampled,
                updates_accepted=pending.accepted,
                updates_rejected=pending.rejected,
                train_loss=pending.train_loss,
                held_out_loss=held_out,
                seconds=seconds,
            )
        )
        with transaction(self.engine) as session:
            session.add_all(rows)
        if held_out is not None:
            self.progress(
                f"round {server_round}/{self.rounds}: global held-out loss {held_out:.3f} "
                f"(perplexity {math.exp(held_out):.2f}) on {len(outcomes)} nodes, "
                f"{seconds:.0f} s"
            )
        self._round_started = time.perf_counter()
