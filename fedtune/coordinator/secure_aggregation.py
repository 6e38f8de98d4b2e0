"""Training rounds under Flower's SecAgg+ (Bell et al. 2020): the coordinator learns only the
weighted mean of the nodes' adapters, never one node's.

Flower offers SecAgg+ only through its workflow API, which drives a legacy ``Strategy``:
:class:`SecureFedAvg` is that strategy. It samples the nodes, sends them fedtune's
instructions, and receives the unmasked weighted mean with each node's reply minus its arrays
(metrics, privacy report, signed ledger entry, or a decline). Because a single update cannot
be taken out of a secure sum, the mean is kept only when every reply that went into it
carries a ledger entry that verifies; otherwise the round keeps the previous global adapter
and says why. Each reply is attributed to its sender's enrolled name (``enrolled``, see
:mod:`fedtune.coordinator.roster`); one that names another node is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedtune.common.errors import FedtuneError
from fedtune.coordinator.ledger_check import LedgerCheck
from fedtune.coordinator.roster import name_problem, reported_name
from fedtune.coordinator.strategy import (
    EnrolledName,
    ReplyOutcome,
    RoundObserver,
    update_problem,
)
from fedtune.platform.wire.messages import (
    ARRAYS,
    DECLINE,
    METRICS,
    NUM_EXAMPLES,
    TrainInstructions,
    arrays_to_record,
    record_to_arrays,
)
from fedtune.platform.wire.packed_arrays import ArrayLayout
from fedtune.platform.wire.secure_messages import (
    SecureMessageError,
    mask_generator_problem,
    secure_train_config,
    train_reply_from_secure_metrics,
)
from fedtune.privacy.node_level_dp import NodeLevelPrivacy


class NotEnoughNodesError(FedtuneError, RuntimeError):
    """Fewer nodes connected than the run needs, within the time it waits for them."""


class SecureFedAvg(FedAvg):
    """The strategy :class:`flwr.server.workflow.SecAggPlusWorkflow` drives for fedtune."""

    def __init__(
        self,
        *,
        instructions: TrainInstructions,
        global_arrays: ArrayRecord,
        observer: RoundObserver,
        ledger_check: LedgerCheck,
        min_nodes: int,
        fraction_train: float = 1.0,
        node_wait_s: float = 300.0,
        node_dp: NodeLevelPrivacy | None = None,
        enrolled: EnrolledName | None = None,
    ) -> None:
        if min_nodes < 2:
            raise ValueError("secure aggregation needs at least 2 nodes per round (min_nodes)")
        super().__init__(
            fraction_fit=fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=min_nodes,
            min_available_clients=min_nodes,
        )
        self.instructions = instructions
        self.global_arrays = global_arrays
        self.observer = observer
        self.ledger_check = ledger_check
        self.node_wait_s = node_wait_s
        self.node_dp = node_dp
        self.enrolled = enrolled
        # The adapter travels, and is masked and summed, as one vector in this layout.
        self.layout = ArrayLayout.of(record_to_arrays(global_arrays))
        self.sampled: list[str] = []
        self.recorded_round: int | None = None  # the last round aggregate_fit recorded

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if not client_manager.wait_for(self.min_fit_clients, timeout=int(self.node_wait_s)):
            raise NotEnoughNodesError(
                f"round {server_round}: {client_manager.num_available()} nodes connected, "
                f"{self.min_fit_clients} needed, after waiting {self.node_wait_s:g} s"
            )
        size, minimum = self.num_fit_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=size, min_num_clients=minimum)
        self.sampled = [str(client.node_id) for client in clients]
        if self.node_dp is not None:
            self.node_dp.check_round()
        config = secure_train_config(
            self.instructions,
            server_round=server_round,
            layout=self.layout,
            clipping_norm=self.node_dp.settings.clipping_norm if self.node_dp else None,
        )
        return [(client, FitIns(parameters, dict(config))) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        outcomes = [self._outcome(server_round, proxy, res) for proxy, res in results]
        answered = {o.flower_node_id for o in outcomes}
        reasons = "; ".join(str(f) for f in failures) or "no reply"
        outcomes += [
            ReplyOutcome(
                "failed",
                node_id,
                self.name_of(node_id),
                f"dropped out of secure aggregation ({reasons})",
            )
            for node_id in self.sampled
            if node_id not in answered
        ]
        aggregate, problem = self._mean(results, outcomes)
        if problem is not None:
            outcomes = [
                ReplyOutcome("rejected", o.flower_node_id, o.node_name, problem, ledger=o.ledger)
                if o.kind == "accepted"
                else o
                for o in outcomes
            ]
        metrics = _weighted_train_loss(outcomes)
        if aggregate is not None and self.node_dp is not None:
            contributors = sum(o.kind == "accepted" for o in outcomes)
            aggregate = arrays_to_record(
                self.node_dp.noise(record_to_arrays(aggregate), contributors=contributors)
            )
            epsilon = self.node_dp.record(server_round, contributors=contributors)
            metrics = MetricRecord({**(metrics or {}), "node-level-epsilon": epsilon})
        self.observer.on_train(server_round, outcomes, aggregate, metrics, self.global_arrays)
        self.recorded_round = server_round
        if aggregate is None:
            return None, {}
        self.global_arrays = aggregate
        return self.parameters(), {}

    def parameters(self) -> Parameters:
        """The global adapter as the one vector a secure train message carries."""
        return ndarrays_to_parameters([self.layout.flatten(record_to_arrays(self.global_arrays))])

    def name_of(self, node_id: int | str) -> str | None:
        """A sampled node's enrolled name (None: no roster, or not enrolled)."""
        return self.enrolled(int(node_id)) if self.enrolled is not None else None

    def _outcome(self, server_round: int, proxy: ClientProxy, res: FitRes) -> ReplyOutcome:
        node_id = str(proxy.node_id)
        try:
            content = train_reply_from_secure_metrics(res.metrics)
        except SecureMessageError as exc:
            return ReplyOutcome("rejected", node_id, self.name_of(node_id), str(exc))
        wrong_masks = mask_generator_problem(res.metrics)
        if wrong_masks is not None:
            return ReplyOutcome("rejected", node_id, self.name_of(node_id), wrong_masks)
        name = reported = reported_name(content)
        if self.enrolled is not None:
            name = self.name_of(node_id)
            wrong = name_problem(name, reported, node_id)
            if wrong is not None:
                return ReplyOutcome("rejected", node_id, name, wrong)
        if DECLINE in content.config_records:
            reason = str(content.config_records[DECLINE].get("reason", "no reason given"))
            return ReplyOutcome("declined", node_id, name, reason)
        weight = content.metric_records[METRICS].get(NUM_EXAMPLES) if METRICS in content else None
        if self.node_dp is not None:
            weight = 1  # under node-level DP every node weighs the same
        if weight != res.num_examples:
            return ReplyOutcome(
                "rejected", node_id, name, f"weight {res.num_examples} differs from {weight}"
            )
        signed, problem = self.ledger_check(server_round, name, content)
        if problem is not None:
            return ReplyOutcome("rejected", node_id, name, problem, ledger=signed)
        return ReplyOutcome("accepted", node_id, name, reply=content, ledger=signed)

    def _mean(
        self,
        results: list[tuple[ClientProxy, FitRes]],
        outcomes: Sequence[ReplyOutcome],
    ) -> tuple[ArrayRecord | None, str | None]:
        """The unmasked weighted mean, if it may become the next global adapter."""
        if not any(o.kind == "accepted" for o in outcomes):
            return None, None
        refused = sorted(o.node_name or o.flower_node_id for o in outcomes if o.kind == "rejected")
        if refused:
            return None, (
                f"the secure mean includes updates of {refused}, whose replies were refused; "
                "a single update cannot be removed from it, so the round is discarded"
            )
        vectors = parameters_to_ndarrays(results[0][1].parameters)  # the mean, in every result
        if len(vectors) != 1 or vectors[0].shape != (self.layout.size,):
            shapes = [v.shape for v in vectors][:3]
            return None, f"the secure mean is {shapes}, expected one vector of {self.layout.size}"
        mean = arrays_to_record(self.layout.split(vectors[0].astype(self.layout.dtype, copy=False)))
        problem = update_problem(_as_reply(mean), self.global_arrays)
        return (
            (mean, None) if problem is None else (None, f"the secure mean is unusable: {problem}")
        )


def _as_reply(arrays: ArrayRecord) -> RecordDict:
    """The mean dressed as one reply, so that :func:`update_problem` checks it."""
    return RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: 1})})


def _weighted_train_loss(outcomes: Sequence[ReplyOutcome]) -> MetricRecord | None:
    pairs = []
    for outcome in outcomes:
        if outcome.kind != "accepted" or outcome.content is None:
            continue
        metrics = outcome.content.metric_records[METRICS]
        loss, weight = metrics.get("train-loss"), metrics.get(NUM_EXAMPLES)
        if isinstance(loss, float) and np.isfinite(loss) and isinstance(weight, int):
            pairs.append((loss, weight))
    if not pairs:
        return None
    total = sum(weight for _, weight in pairs)
    return MetricRecord({"train-loss": sum(loss * weight for loss, weight in pairs) / total})
