"""FedAvg over LoRA adapter arrays that aggregates only the replies it can trust.

Aggregation itself is Flower's (``flwr.serverapp.strategy.FedAvg``: the mean of the replies'
arrays weighted by ``num-examples``, McMahan et al. 2017). This subclass sorts each round's
replies first: a node's error (``failed``), a node's ``decline`` (e.g. its privacy budget), or
an update with wrong keys, shapes, dtype or non-finite values (``rejected``) is left out with
its reason, and the rest are aggregated. With a :class:`~fedtune.coordinator.ledger_check.
LedgerCheck`, a train reply must also carry a signed ledger entry that verifies; a verified
entry is kept with the outcome even when the update itself is rejected (the node did spend
that epsilon). Every outcome goes to a :class:`RoundObserver`.

In deployment a reply is attributed to the enrolled name of the SuperNode that sent it
(``enrolled``, see :mod:`fedtune.coordinator.roster`), and rejected when it names another
node; in simulation, which has no enrollment, to the name it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.coordinator.ledger_check import LedgerCheck, SignedRound
from fedtune.coordinator.roster import name_problem
from fedtune.platform.wire.messages import (
    ARRAYS,
    DECLINE,
    LEDGER,
    METRICS,
    NODE,
    NUM_EXAMPLES,
    ProtocolMismatchError,
    arrays_to_record,
    check_protocol,
    record_to_arrays,
    with_receipt,
)
from fedtune.platform.wire.packed_arrays import PackedArraysError, is_packed, pack, unpack
from fedtune.platform.wire.plain_upload import widened
from fedtune.privacy.receipts import Receipt

OutcomeKind = Literal["accepted", "rejected", "declined", "failed"]
EnrolledName = Callable[[int], str | None]  # a SuperNode id -> its enrolled name


@dataclass(frozen=True)
class ReplyOutcome:
    """What became of one node's reply in one round."""

    kind: OutcomeKind
    flower_node_id: str
    node_name: str | None
    reason: str | None = None
    message: Message | None = None  # set for accepted replies
    ledger: SignedRound | None = None  # the reply's verified ledger entry, if any
    reply: RecordDict | None = None  # an accepted secure reply: its content minus the arrays

    @property
    def content(self) -> RecordDict | None:
        return self.message.content if self.message is not None else self.reply


class RoundObserver(Protocol):
    def on_train(
        self,
        server_round: int,
        outcomes: list[ReplyOutcome],
        aggregate: ArrayRecord | None,
        metrics: MetricRecord | None,
        sent: ArrayRecord,
    ) -> None: ...

    def on_evaluate(
        self, server_round: int, outcomes: list[ReplyOutcome], metrics: MetricRecord | None
    ) -> None: ...


def weight_problem(weight: object) -> str | None:
    """Why a reply's ``num-examples`` cannot weigh it in a mean (None: it can)."""
    if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
        return f"'{NUM_EXAMPLES}' must be a positive integer, got {weight!r}"[:200]
    return None


def update_problem(content: RecordDict, expected: ArrayRecord) -> str | None:
    """Why a train reply cannot be aggregated against the global ``expected`` arrays, or None."""
    if len(content.array_records) != 1 or ARRAYS not in content.array_records:
        return f"expected exactly one array record named '{ARRAYS}'"
    if len(content.metric_records) != 1 or METRICS not in content.metric_records:
        return f"expected exactly one metric record named '{METRICS}'"
    problem = weight_problem(content.metric_records[METRICS].get(NUM_EXAMPLES))
    if problem is not None:
        return problem
    arrays = content.array_records[ARRAYS]
    if is_packed(arrays):  # as it came (open_update opens every packed update that holds)
        try:
            arrays = arrays_to_record(unpack(arrays))
        except PackedArraysError as exc:
            return f"its packed update cannot be read: {exc}"
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, reference in expected.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(reference.shape):
            return f"{name} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
        if value.dtype != reference.dtype:
            return f"{name} has dtype {value.dtype}, expected {reference.dtype}"
        if not np.isfinite(value.numpy()).all():
            return f"{name} has non-finite values (NaN or inf)"
    return None


def _node_name(message: Message) -> str | None:
    if message.has_content() and NODE in message.content.config_records:
        name = message.content.config_records[NODE].get("name")
        return name if isinstance(name, str) else None
    return None


def protocol_problem(message: Message, name: str | None) -> str | None:
    """Why a reply in another fedtune protocol is refused (None: it speaks this one)."""
    identity = message.content.config_records.get(NODE, ConfigRecord())
    try:
        check_protocol(identity, who=f"node {name}")
    except ProtocolMismatchError as exc:
        return str(exc)
    return None


def attributed_name(
    message: Message, enrolled: EnrolledName | None
) -> tuple[str | None, str | None]:
    """Whose ``message`` is, and why it cannot be taken (None: it can). Without a roster
    (simulation) the name it reports; with one, the sender's enrolled name."""
    reported = _node_name(message)
    if enrolled is None:
        return reported, None
    node_id = message.metadata.src_node_id
    name = enrolled(node_id)
    return name, name_problem(name, reported, node_id)


def sort_train_replies(
    replies: Iterable[Message],
    expected: ArrayRecord,
    *,
    server_round: int,
    ledger_check: LedgerCheck | None = None,
    enrolled: EnrolledName | None = None,
) -> list[ReplyOutcome]:
    outcomes = []
    for message in replies:
        node_id = str(message.metadata.src_node_id)
        name, wrong = attributed_name(message, enrolled)
        if message.has_error():
            reason = f"node error {message.error.code}: {message.error.reason}"
            outcomes.append(ReplyOutcome("failed", node_id, name, reason))
            continue
        if wrong is not None:
            outcomes.append(ReplyOutcome("rejected", node_id, name, wrong))
            continue
        if DECLINE in message.content.config_records:
            reason = str(message.content.config_records[DECLINE].get("reason", "no reason given"))
            outcomes.append(ReplyOutcome("declined", node_id, name, reason))
            continue
        mismatch = protocol_problem(message, name)
        if mismatch is not None:
            outcomes.append(ReplyOutcome("rejected", node_id, name, mismatch))
            continue
        signed, problem = None, None
        if ledger_check is not None:
            signed, problem = ledger_check(server_round, name, message.content)
        problem = update_problem(message.content, expected) or problem
        if problem is not None:
            outcomes.append(ReplyOutcome("rejected", node_id, name, problem, ledger=signed))
        else:
            outcomes.append(ReplyOutcome("accepted", node_id, name, message=message, ledger=signed))
    return outcomes


def common_metrics(messages: list[Message]) -> list[Message]:
    """``messages`` with their metrics cut to the numbers every one of them carries, for
    Flower's FedAvg, which averages only identical sets: nodes that release different
    metrics (``privacy.release_metrics``) still count. A name some node sends as a list is
    left out too (no reply metric is one; FedAvg would fail adding a list to a number). The
    originals are left as they are (the recorder stores each node's own)."""
    if not messages:
        return messages
    common = set.intersection(
        *(
            {k for k, v in m.content.metric_records[METRICS].items() if not isinstance(v, list)}
            for m in messages
        )
    )
    trimmed = []
    for message in messages:
        records: dict[str, Any] = dict(message.content.items())
        records[METRICS] = MetricRecord(
            {k: v for k, v in message.content.metric_records[METRICS].items() if k in common}
        )
        # For aggregation only, never sent: the reply's metadata as it came.
        trimmed.append(Message(content=RecordDict(records), metadata=message.metadata))  # type: ignore[call-overload]
    return trimmed


def sort_evaluate_replies(
    replies: Iterable[Message],
    *,
    server_round: int = 0,
    ledger_check: LedgerCheck | None = None,
    enrolled: EnrolledName | None = None,
) -> list[ReplyOutcome]:
    """Evaluate replies sorted; metrics released under DP come with the signed ledger entry
    of the release, which must verify (``ledger_check``) for the metrics to be used."""
    outcomes = []
    for message in replies:
        node_id = str(message.metadata.src_node_id)
        name, wrong = attributed_name(message, enrolled)
        if message.has_error():
            reason = f"node error {message.error.code}: {message.error.reason}"
            outcomes.append(ReplyOutcome("failed", node_id, name, reason))
        elif wrong is not None:
            outcomes.append(ReplyOutcome("rejected", node_id, name, wrong))
        elif METRICS not in message.content.metric_records:
            outcomes.append(ReplyOutcome("rejected", node_id, name, "no metrics in reply"))
        elif NUM_EXAMPLES not in message.content.metric_records[METRICS]:
            reason = "released no evaluation metrics (the node's privacy.release_metrics)"
            outcomes.append(ReplyOutcome("declined", node_id, name, reason))
        elif problem := weight_problem(message.content.metric_records[METRICS][NUM_EXAMPLES]):
            outcomes.append(ReplyOutcome("rejected", node_id, name, problem))
        elif LEDGER in message.content.config_records and ledger_check is not None:
            signed, problem = ledger_check(
                server_round, name, message.content, kind="metric_release"
            )
            if problem is not None:
                outcomes.append(ReplyOutcome("rejected", node_id, name, problem))
            else:
                outcomes.append(
                    ReplyOutcome("accepted", node_id, name, message=message, ledger=signed)
                )
        else:
            outcomes.append(ReplyOutcome("accepted", node_id, name, message=message))
    return outcomes


def open_update(content: RecordDict, *, widen: bool = False) -> None:
    """A train reply's packed update (packed_arrays.py) as named arrays, in place, and with
    ``widen`` a float16 one widened to float32 (plain_upload.py). A packed update that cannot
    be opened is left as it came, for :func:`update_problem` to say why it is refused."""
    if ARRAYS not in content.array_records:
        return
    record = content.array_records[ARRAYS]
    if is_packed(record):
        try:
            record = arrays_to_record(unpack(record))
        except PackedArraysError:
            return
    content.array_records[ARRAYS] = widened(record) if widen else record


class ValidatingFedAvg(FedAvg):
    """Flower's FedAvg, fed only the replies that pass :func:`update_problem`; with
    ``enrolled``, replies are attributed to their sender's enrolled name."""

    def __init__(
        self,
        *,
        observer: RoundObserver,
        ledger_check: LedgerCheck | None = None,
        enrolled: EnrolledName | None = None,
        receipts: Callable[[str], Receipt | None] | None = None,
        upload_dtype: str = "float32",
        **fedavg_options: object,
    ) -> None:
        super().__init__(**fedavg_options)  # type: ignore[arg-type]
        self.upload_dtype = upload_dtype  # the run's plain upload (plain_upload.py)
        self.observer = observer
        self.ledger_check = ledger_check
        self.enrolled = enrolled
        self.receipts = receipts
        # The global arrays sent out this round: replies must match their keys and shapes.
        self.global_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        return super().configure_train(server_round, pack(record_to_arrays(arrays)), config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():  # a float16 upload is checked and averaged in float32
                open_update(reply.content, widen=self.upload_dtype == "float16")
        outcomes = sort_train_replies(
            replies,
            self.global_arrays,
            server_round=server_round,
            ledger_check=self.ledger_check,
            enrolled=self.enrolled,
        )
        accepted = [o.message for o in outcomes if o.message is not None]
        arrays, metrics = None, None
        if accepted:
            arrays, metrics = super().aggregate_train(server_round, common_metrics(accepted))
        self.observer.on_train(server_round, outcomes, arrays, metrics, self.global_arrays)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's evaluate messages, each with the coordinator's receipt for the latest
        ledger head its node sent (``receipts``), which the node keeps beside its entry."""
        messages = super().configure_evaluate(
            server_round, pack(record_to_arrays(arrays)), config, grid
        )
        if self.receipts is None:
            return messages
        out = []
        for message in messages:
            receipt = self.receipts(str(message.metadata.dst_node_id))
            if receipt is not None:
                message = Message(
                    content=with_receipt(message.content, receipt),
                    message_type=message.metadata.message_type,
                    dst_node_id=message.metadata.dst_node_id,
                )
            out.append(message)
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        outcomes = sort_evaluate_replies(
            replies,
            server_round=server_round,
            ledger_check=self.ledger_check,
            enrolled=self.enrolled,
        )
        accepted = [o.message for o in outcomes if o.message is not None]
        metrics = (
            super().aggregate_evaluate(server_round, common_metrics(accepted)) if accepted else None
        )
        self.observer.on_evaluate(server_round, outcomes, metrics)
        return metrics
