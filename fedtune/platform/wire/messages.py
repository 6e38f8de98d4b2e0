"""What the coordinator and the nodes say to each other: the contents of Flower messages.

The coordinator never imports the node and the node never imports the coordinator; both build
and read messages through this module. A train message carries the global adapter (``arrays``)
and :class:`TrainInstructions` (``config``); a train reply carries the node's adapter, its
``metrics`` (``num-examples`` weighs it in FedAvg), who it is (``node``) and what the round cost
with the signed ledger entry of the round and the signed head of the node's ledger
(``ledger``) — the round's only privacy record — and the node's plan for its budget
(``budget``: target and planned rounds), or a ``decline`` with the reason. Only metrics leave
a node in evaluation.

Both sides state the protocol they speak (:data:`PROTOCOL`): a node refuses instructions in
another one before it trains (it declines, saying why), and the coordinator refuses replies in
another one, so a node and a coordinator of different fedtune versions never half-understand
each other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.common.errors import FedtuneError
from fedtune.platform.config import GRPO_DEFAULTS, LoraSettings
from fedtune.platform.wire.packed_arrays import is_packed, pack, unpack
from fedtune.privacy.ledger import Checkpoint, LedgerEntry, LedgerFormatError
from fedtune.privacy.receipts import Receipt

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NODE = "node"
BUDGET = "budget"
DECLINE = "decline"
LEDGER = "ledger"
RECEIPT = "receipt"  # an evaluate message's countersigned head of the receiving node's ledger
ABTEST = "abtest"  # an A/B test's instructions, and the node's note on what it shared
SCORES = "scores"  # an A/B test reply's per-example scores or paired statistics
ABTEST_MESSAGE_TYPE = "evaluate.abtest"  # routed to the ClientApp's @app.evaluate("abtest")
DESCRIBE_MESSAGE_TYPE = "query.describe"  # a node's identity and training-set size
NUM_EXAMPLES = "num-examples"  # FedAvg's weight
SERVER_ROUND = "server-round"  # set by Flower's strategies
SECURE_AGGREGATION = "secure-aggregation"  # set in a train config that came through SecAgg+
# A reply's cost figures (release_metrics = "plain"): tokens the forward passes read (padding
# excluded), seconds of compute on the device, and the node's whole time on the message.
TRAIN_TOKENS = "train-tokens"
TRAIN_DEVICE_SECONDS = "train-device-seconds"
EVALUATE_TOKENS = "evaluate-tokens"
EVALUATE_DEVICE_SECONDS = "evaluate-device-seconds"
NODE_SECONDS = "node-seconds"
# An evaluate reply's figures on held-out preference pairs (release_metrics = "plain"): how
# many pairs, the share whose implicit DPO reward prefers the chosen answer, the mean margin.
HELD_OUT_PAIRS = "held-out-pairs"
PREFERENCE_ACCURACY = "preference-accuracy"
REWARD_MARGIN = "reward-margin"
# An A/B metric on held-out GRPO prompts: per prompt, the greedy completion's summed reward.
REWARD = "reward"
# What this version's messages mean. fedtune-wire/1 (fedtune 0.1, which stated none) sent an
# unsigned privacy report beside the ledger entry; in fedtune-wire/2 a train message had no
# training method (a node of that version would train SFT in a DPO run); in fedtune-wire/3 it
# had no GRPO settings and no plain upload type (float16 uploads); in fedtune-wire/4 adapters
# travelled as one Flower array per tensor (in fedtune-wire/5 packed: packed_arrays.py); a
# fedtune-wire/5 node sends a 2**24 modulus's masked values as uint32, not three bytes each
# (masked_upload.py).
PROTOCOL = "fedtune-wire/6"
PROTOCOL_KEY = "protocol"


class ProtocolMismatchError(FedtuneError, ValueError):
    """The other side speaks another fedtune protocol (another fedtune version)."""


def _stated(value: object) -> str:
    """What the other side stated, for a message that is stored and shown: the other side
    is not trusted, so its text is quoted and cut short."""
    if value is None:
        return "fedtune-wire/1 (fedtune 0.1: none stated)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_protocol(record: ConfigRecord, *, who: str) -> None:
    """Refuse ``record`` (from ``who``) unless it states this version's protocol."""
    stated = record.get(PROTOCOL_KEY)
    if stated != PROTOCOL:
        raise ProtocolMismatchError(
            f"{who} speaks {_stated(stated)}, this side {PROTOCOL}: run the same fedtune "
            "version on the coordinator and every node"
        )


@dataclass(frozen=True)
class TrainInstructions:
    """The round's plan, identical for every node; each node keeps its own privacy target."""

    run_id: str
    base_model_fingerprint: str
    steps: int
    batch_size: int
    learning_rate: float
    optimizer: str
    planned_rounds: int
    lora: LoraSettings
    evaluate_local_model: bool
    # What the run trains: "sft" (conversations), "dpo" (preference pairs, with dpo_beta) or
    # "grpo" (prompts with answers, with the training.grpo_* settings, keyed as in the config).
    method: str = "sft"
    dpo_beta: float = 0.1
    # A plain round's update on the wire: "float32" or "float16" (plain_upload.py).
    upload_dtype: str = "float32"
    grpo: Mapping[str, Any] = field(default_factory=lambda: dict(GRPO_DEFAULTS))

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                PROTOCOL_KEY: PROTOCOL,
                "run-id": self.run_id,
                "base-model-fingerprint": self.base_model_fingerprint,
                "steps": self.steps,
                "batch-size": self.batch_size,
                "learning-rate": self.learning_rate,
                "optimizer": self.optimizer,
                "planned-rounds": self.planned_rounds,
                "lora-r": self.lora.r,
                "lora-alpha": self.lora.alpha,
                "lora-dropout": self.lora.dropout,
                # [] on the wire: the model family's default (unset in the run config).
                "lora-target-modules": list(self.lora.target_modules or []),
                "lora-train-a": self.lora.train_a,
                "evaluate-local-model": self.evaluate_local_model,
                "training-method": self.method,
                "dpo-beta": self.dpo_beta,
                "upload-dtype": self.upload_dtype,
                **{_grpo_key(key): self.grpo[key] for key in GRPO_DEFAULTS},
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstructions:
        """The instructions in ``record``; :class:`ProtocolMismatchError` when a coordinator
        of another fedtune version sent them."""
        check_protocol(record, who="the coordinator")
        try:
            return cls(
                run_id=str(record["run-id"]),
                base_model_fingerprint=str(record["base-model-fingerprint"]),
                steps=int(record["steps"]),  # type: ignore[arg-type]
                batch_size=int(record["batch-size"]),  # type: ignore[arg-type]
                learning_rate=float(record["learning-rate"]),  # type: ignore[arg-type]
                optimizer=str(record["optimizer"]),
                planned_rounds=int(record["planned-rounds"]),  # type: ignore[arg-type]
                lora=LoraSettings(
                    r=int(record["lora-r"]),  # type: ignore[arg-type]
                    alpha=int(record["lora-alpha"]),  # type: ignore[arg-type]
                    dropout=float(record["lora-dropout"]),  # type: ignore[arg-type]
                    target_modules=[str(m) for m in record["lora-target-modules"]] or None,  # type: ignore[union-attr]
                    train_a=bool(record["lora-train-a"]),
                ),
                evaluate_local_model=bool(record["evaluate-local-model"]),
                method=str(record["training-method"]),
                dpo_beta=float(record["dpo-beta"]),  # type: ignore[arg-type]
                upload_dtype=str(record["upload-dtype"]),
                grpo={key: _grpo_value(record[_grpo_key(key)]) for key in GRPO_DEFAULTS},
            )
        except KeyError as exc:
            raise ValueError(f"train message lacks config key {exc}") from None


# A GRPO round's health in a train reply (release_metrics = "plain"): the wire name of each
# figure of the node's round report (fedtune.client_node.local_round.LocalRound.grpo).
GRPO_METRICS = {
    "grpo-mean-reward": "mean_reward",
    "grpo-format-share": "format_share",
    "grpo-completion-tokens": "completion_tokens",
    "grpo-kl": "kl",
}


def _grpo_key(key: str) -> str:
    return key.replace("_", "-")


def _grpo_value(value: Any) -> Any:
    """A GRPO setting as sent: a number, or the list of reward names."""
    return [str(v) for v in value] if isinstance(value, list) else value


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` as a record of one Flower array each, for use in this process; what goes on
    the wire is packed (:func:`fedtune.platform.wire.packed_arrays.pack`)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named arrays of ``record``, packed or not; ``PackedArraysError`` for a packed
    record whose layout does not hold."""
    if is_packed(record):
        return unpack(record)
    return {name: array.numpy() for name, array in record.items()}


def node_identity(*, name: str, base_model_fingerprint: str, data_fingerprint: str) -> ConfigRecord:
    return ConfigRecord(
        {
            "name": name,
            PROTOCOL_KEY: PROTOCOL,
            "base-model-fingerprint": base_model_fingerprint,
            "data-fingerprint": data_fingerprint,
        }
    )


def budget_record(budget: Mapping[str, Any]) -> ConfigRecord:
    """A node's plan for its budget (target epsilon, planned rounds, private rounds on the
    data set so far; its budget group, when it has one) as a ConfigRecord; absent figures are
    left out, never None."""
    return ConfigRecord(
        {
            key: value
            for key, value in budget.items()
            if isinstance(value, (str, int, float, bool))
            or (isinstance(value, list) and all(isinstance(item, str) for item in value))
        }
    )


def train_reply_content(
    *,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, int | float],
    identity: ConfigRecord,
    budget: Mapping[str, Any],
    ledger: tuple[LedgerEntry, Checkpoint],
) -> RecordDict:
    return RecordDict(
        {
            ARRAYS: pack(arrays),
            METRICS: MetricRecord(dict(metrics)),
            NODE: identity,
            BUDGET: budget_record(budget),
            LEDGER: ledger_record(ledger),
        }
    )


def evaluate_reply_content(
    *,
    metrics: Mapping[str, int | float],
    identity: ConfigRecord,
    ledger: tuple[LedgerEntry, Checkpoint] | None = None,
) -> RecordDict:
    """An evaluate reply: the node's released metrics (none at all with
    ``privacy.release_metrics = "none"``) and, for metrics released under DP, the signed
    ledger entry of the release."""
    records: dict[str, Any] = {METRICS: MetricRecord(dict(metrics)), NODE: identity}
    if ledger is not None:
        records[LEDGER] = ledger_record(ledger)
    return RecordDict(records)


def ledger_record(ledger: tuple[LedgerEntry, Checkpoint]) -> ConfigRecord:
    """A signed ledger entry and the node's signed head after it."""
    entry, checkpoint = ledger
    return ConfigRecord(
        {"entry": json.dumps(entry.to_dict()), "checkpoint": json.dumps(checkpoint.to_dict())}
    )


def ledger_from_content(content: RecordDict) -> tuple[LedgerEntry, Checkpoint]:
    """The signed ledger entry and checkpoint of a train reply; ``LedgerFormatError`` when
    they are missing or malformed."""
    if LEDGER not in content.config_records:
        raise LedgerFormatError("the reply carries no signed ledger entry")
    record = content.config_records[LEDGER]
    try:
        entry = LedgerEntry.from_dict(json.loads(str(record["entry"])))
        checkpoint = Checkpoint.from_dict(json.loads(str(record["checkpoint"])))
    except (KeyError, json.JSONDecodeError) as exc:
        raise LedgerFormatError(f"the reply's ledger record is malformed ({exc})") from None
    return entry, checkpoint


def with_receipt(content: RecordDict, receipt: Receipt) -> RecordDict:
    """``content`` (left as it is) with the coordinator's ``receipt`` for the receiving node."""
    records: dict[str, Any] = dict(content.items())
    records[RECEIPT] = ConfigRecord({"receipt": json.dumps(receipt.to_dict())})
    return RecordDict(records)


def receipt_from_content(content: RecordDict) -> Receipt | None:
    """The coordinator's receipt a message carries (None: none); ``LedgerFormatError`` when
    it is malformed."""
    if RECEIPT not in content.config_records:
        return None
    try:
        return Receipt.from_dict(json.loads(str(content.config_records[RECEIPT]["receipt"])))
    except (KeyError, json.JSONDecodeError) as exc:
        raise LedgerFormatError(f"the message's receipt record is malformed ({exc})") from None


def decline_content(*, identity: ConfigRecord, reason: str) -> RecordDict:
    """A node that will not train this round (e.g. its privacy budget would be passed)."""
    return RecordDict({NODE: identity, DECLINE: ConfigRecord({"reason": reason})})


@dataclass(frozen=True)
class AbTestInstructions:
    """What each node scores in an A/B test: versions ``a`` and ``b`` (arrays under
    ``arrays-a``/``arrays-b``; a version without arrays is the base model alone) on its first
    ``max_examples`` held-out examples, for ``metrics``."""

    test_id: str
    base_model_fingerprint: str
    version_a: str
    version_b: str
    lora_a: LoraSettings | None
    lora_b: LoraSettings | None
    metrics: tuple[str, ...]
    max_examples: int
    max_new_tokens: int
    # The beta of the implicit DPO reward behind reward-margin (preference-accuracy does
    # not depend on it); absent from the record of a sender that predates it.
    dpo_beta: float = 0.1

    def to_record(self) -> ConfigRecord:
        record: dict[str, Any] = {
            "test-id": self.test_id,
            "dpo-beta": self.dpo_beta,
            "base-model-fingerprint": self.base_model_fingerprint,
            "version-a": self.version_a,
            "version-b": self.version_b,
            "metrics": list(self.metrics),
            "max-examples": self.max_examples,
            "max-new-tokens": self.max_new_tokens,
        }
        for side, lora in (("a", self.lora_a), ("b", self.lora_b)):
            if lora is not None:
                record[f"lora-{side}"] = lora.model_dump_json()
        return ConfigRecord(record)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> AbTestInstructions:
        def lora(side: str) -> LoraSettings | None:
            text = record.get(f"lora-{side}")
            return LoraSettings.model_validate_json(str(text)) if text is not None else None

        try:
            return cls(
                test_id=str(record["test-id"]),
                base_model_fingerprint=str(record["base-model-fingerprint"]),
                version_a=str(record["version-a"]),
                version_b=str(record["version-b"]),
                lora_a=lora("a"),
                lora_b=lora("b"),
                metrics=tuple(str(m) for m in record["metrics"]),  # type: ignore[union-attr]
                max_examples=int(record["max-examples"]),  # type: ignore[arg-type]
                max_new_tokens=int(record["max-new-tokens"]),  # type: ignore[arg-type]
                dpo_beta=float(record.get("dpo-beta", 0.1)),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise ValueError(f"A/B test message lacks config key {exc}") from None


# A node whose policy forbids per-example scores sends these paired statistics per metric
# (as "METRIC/FIELD"); d = b - a; the counts are for right/wrong metrics (A wrong and B right,
# A right and B wrong).
SUMMARY_FIELDS = ("n", "sum_a", "sum_b", "sum_d", "sum_d2", "b_only", "a_only")
