"""Records each round of a run in the coordinator's database and checkpoints the global
adapter. A round's writes (its row, the nodes' metrics and cost figures, the copies of their
signed ledger entries — the round's only privacy record — with the coordinator's receipt for
each, the copy of the coordinator's own node-level DP entry, the rejected updates and the
checkpoint row) commit together once its evaluation is in. Each node gets its receipt in the
round's evaluate message (:meth:`RunRecorder.receipt_for`).

Every figure a node sends is its own word: what is stored is checked first (a count must be a
whole number in range, a cost figure finite and plausible, see
:mod:`fedtune.coordinator.node_costs`), so that no reply can fail a round's commit."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import AdapterCheckpointer
from fedtune.coordinator.health import (
    Alert,
    Signal,
    budget_alerts,
    loss_alerts,
    preference_alerts,
    preference_signals,
    rejection_alerts,
    update_signals,
)
from fedtune.coordinator.node_costs import cost_row, read_costs
from fedtune.coordinator.strategy import ReplyOutcome
from fedtune.platform.db.storage import (
    AdapterCheckpoint,
    BudgetGroup,
    HealthAlert,
    HealthSignal,
    NodeLevelEntry,
    NodeMetric,
    RejectedUpdate,
    Round,
)
from fedtune.platform.wire.messages import (
    ARRAYS,
    BUDGET,
    GRPO_METRICS,
    METRICS,
    NUM_EXAMPLES,
    record_to_arrays,
)
from fedtune.privacy.ledger_store import checkpoint_row, entry_row, receipt_row
from fedtune.privacy.node_level_dp import NodeLevelPrivacy
from fedtune.privacy.receipts import Receipt, witness_of
from fedtune.privacy.signing import NodeKey


def _planned_epsilon(content: RecordDict | None) -> float | None:
    """The epsilon a node's plan expected by this round, as its budget record states it."""
    if content is None or BUDGET not in content.config_records:
        return None
    return _finite(content.config_records[BUDGET].get("planned_epsilon"))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)  # an int past a float's range raises
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


MAX_GROUP = 64  # data sets one budget group may name
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def group_members(value: Any) -> list[str]:
    """A reply's ``budget_group`` as stored: up to :data:`MAX_GROUP` data-set fingerprints;
    anything else (not a list, another kind of item) is no group at all."""
    if not isinstance(value, list) or len(value) > MAX_GROUP:
        return []
    if not all(isinstance(item, str) and _FINGERPRINT.fullmatch(item) for item in value):
        return []
    return list(value)


MAX_COUNT = 2**31 - 1  # an INTEGER column's largest value (PostgreSQL)


def _count(value: Any) -> int:
    """A reply's example count as stored: a whole number in an INTEGER's range, else 0 (the
    reply's metrics keep what was sent, as far as it is a finite number)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return 0
    return value


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
        # Global held-out preference accuracy per round (None: no node holds pairs).
        self._preference: list[float | None] = []
        self._round_started = time.perf_counter()
        # Node-level DP of a secure run (set by the deployment loop): its ledger entries are
        # copied into the database with the round they noised.
        self.node_level: NodeLevelPrivacy | None = None
        self._node_level_copied: set[int] = set()  # seq of the entries copied

    def _node_level_rows(self, server_round: int) -> list[Any]:
        """The copy of the coordinator's node-level ledger entry of this round, if any."""
        if self.node_level is None or self.node_level.latest is None:
            return []
        entry, checkpoint = self.node_level.latest
        if entry.round != server_round or entry.seq in self._node_level_copied:
            return []
        self._node_level_copied.add(entry.seq)
        return [
            NodeLevelEntry(
                run_id=self.run_id,
                round=server_round,
                seq=entry.seq,
                epsilon_after=entry.epsilon_after,
                entry=entry_row(entry).entry,
                checkpoint=checkpoint_row(checkpoint).checkpoint,
                public_key=self.node_level.ledger.key.public_key_text(),
            )
        ]

    def _reply_rows(
        self, server_round: int, phase: str, outcome: ReplyOutcome, content: RecordDict
    ) -> list[Any]:
        """A reply's metrics as the node sent them (finite numbers only) and its cost."""
        name = self._name(outcome) or f"node-{outcome.flower_node_id}"
        node_metrics = dict(content.metric_records[METRICS])
        return [
            NodeMetric(
                run_id=self.run_id,
                round=server_round,
                phase=phase,
                node_name=name,
                flower_node_id=outcome.flower_node_id,
                num_examples=_count(node_metrics.get(NUM_EXAMPLES, 0)),
                metrics={k: _finite(v) for k, v in node_metrics.items()},
            ),
            cost_row(
                read_costs(node_metrics),
                run_id=self.run_id,
                server_round=server_round,
                phase=phase,
                node_name=name,
                flower_node_id=outcome.flower_node_id,
            ),
        ]

    def _budget_group_rows(self, server_round: int, outcomes: list[ReplyOutcome]) -> list[Any]:
        """The budget group each node stated beside a verified private round, if any: the
        trained data set is the signed entry's, the other members the node's list (only
        fingerprints), its group epsilon kept when it is a finite number."""
        rows: list[Any] = []
        for outcome in outcomes:
            content, signed = outcome.content, outcome.ledger
            if content is None or signed is None or BUDGET not in content.config_records:
                continue
            others = group_members(content.config_records[BUDGET].get("budget_group"))
            if not others or signed.entry.mode != "dp":
                continue
            own = signed.entry.data_fingerprint
            epsilon = _finite(content.config_records[BUDGET].get("group_epsilon"))
            rows.append(
                BudgetGroup(
                    run_id=self.run_id,
                    round=server_round,
                    node_name=signed.entry.node,
                    data_fingerprint=own,
                    members={"fingerprints": sorted({own, *others})},
                    epsilon_after=epsilon if epsilon is not None and epsilon >= 0 else None,
                )
            )
        return rows

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
        pending.rows += self._budget_group_rows(server_round, outcomes)
        pending.rows += self._node_level_rows(server_round)
        for outcome in outcomes:
            if outcome.content is not None:
                pending.rows += self._reply_rows(server_round, "train", outcome, outcome.content)
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
            for metric in GRPO_METRICS:  # a GRPO round's health, when the node sent it
                value = content.metric_records[METRICS].get(metric)
                if value is not None:
                    signals.append(Signal(metric, name, _finite(value)))
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
            if outcome.content is not None:
                rows += self._reply_rows(server_round, "evaluate", outcome, outcome.content)
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
        alerts = loss_alerts(self._held_out)
        preference, accuracy = preference_signals(
            {
                self._name(o) or f"node-{o.flower_node_id}": o.content.metric_records[METRICS]
                for o in outcomes
                if o.content is not None
            }
        )
        self._preference.append(accuracy)
        signals += preference
        alerts += preference_alerts(self._preference)
        rows += self._health_rows(server_round, signals, alerts)
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
                f"(perplexity {math.exp(held_out):.2f})"
                + (f", preference accuracy {accuracy:.3f}" if accuracy is not None else "")
                + f" on {len(outcomes)} nodes, {seconds:.0f} s"
            )
        self._round_started = time.perf_counter()
