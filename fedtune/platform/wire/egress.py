"""The egress manifest: every value a node sends, and how each is protected.

For each message a node answers (``train``, ``evaluate``, ``evaluate.abtest``,
``query.describe``) the manifest lists the records of the reply and their fields: the record's
kind (``arrays``, ``metrics`` or ``config``), the field's type, one line on what it means, and
its protection:

- ``masked``: hidden by secure aggregation (Flower's SecAgg+): the coordinator sees only the
  sum over the round's nodes;
- ``dp``: differentially private, with its accounting (the adapter under DP-SGD, a metric
  through a Gaussian mechanism), recorded in the node's signed ledger;
- ``signed-public``: the node's signed privacy record (ledger entry, ledger head), public by
  design: the coordinator and any auditor read it;
- ``plain``: sent as it is;
- ``not-sent``: declared by the reply's builder but held back under these settings (listed so
  that an auditor sees what a setting withholds).

Beside them it lists what Flower itself sends for the node (:data:`FLOWER_TRAFFIC`): message
metadata, the ClientApp's run time, heartbeats, error replies, connection headers.

The record names, A/B test statistics and secure-aggregation keys are read from the reply
builders' own constants (:mod:`~fedtune.platform.wire.messages`,
:mod:`~fedtune.platform.wire.secure_messages`, Flower's SecAgg+ constants), and
``tests/test_egress_manifest.py`` builds every reply through the node's real code and fails on
any record or field sent that is not declared here, or declared ``not-sent``: a field added to
a builder without its entry here fails that test.

Every declaration lives in this module (:data:`MESSAGE_TYPES`, the ``_*_records`` helpers and
:data:`FLOWER_TRAFFIC`); :func:`egress_manifest` chooses and marks them for a node's settings,
:func:`format_manifest` writes it as text, :meth:`EgressManifest.to_dict` as JSON-able data
(what the audit report and the dashboard show).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedtune.platform.runtime.supernode_entry import HEARTBEAT_EVERY_S, HEARTBEAT_INTERVAL_S
from fedtune.platform.security.enrollment_certificates import KEY_SIGNATURE_RECORD
from fedtune.platform.wire.messages import (
    ABTEST,
    ABTEST_MESSAGE_TYPE,
    ARRAYS,
    BUDGET,
    DECLINE,
    DESCRIBE_MESSAGE_TYPE,
    EVALUATE_DEVICE_SECONDS,
    EVALUATE_TOKENS,
    HELD_OUT_PAIRS,
    LEDGER,
    METRICS,
    NODE,
    NODE_SECONDS,
    NUM_EXAMPLES,
    PREFERENCE_ACCURACY,
    PROTOCOL_KEY,
    REWARD_MARGIN,
    SCORES,
    SUMMARY_FIELDS,
    TRAIN_DEVICE_SECONDS,
    TRAIN_TOKENS,
)
from fedtune.platform.wire.packed_arrays import LAYOUT_KEY, VECTOR_KEY
from fedtune.platform.wire.secure_messages import MASK_GENERATOR_KEY, REPLY_KEY

ReleaseMetrics = Literal["none", "dp", "plain"]
RELEASE_METRICS: tuple[ReleaseMetrics, ...] = ("none", "dp", "plain")
PROTECTIONS = ("masked", "dp", "signed-public", "plain", "not-sent")
KINDS = ("arrays", "metrics", "config")

# Flower's compatibility records, which its SecAgg+ workflow speaks (``fitres.*``).
FITRES_PARAMETERS = "fitres.parameters"
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITRES_METRICS = "fitres.metrics"
FITRES_STATUS = "fitres.status"


@dataclass(frozen=True)
class Field:
    """One field of a reply record. ``name`` may hold ``{placeholders}`` (an adapter
    parameter, an A/B metric) standing for any name without a ``/``."""

    name: str
    type: str
    protection: tuple[str, ...]
    meaning: str
    accounting: str = ""  # for "dp": the mechanism and where it is accounted
    when: str = ""  # when the field is sent ("" always)
    contains: tuple[Record, ...] = ()  # a field that carries serialised records

    def __post_init__(self) -> None:
        unknown = [p for p in self.protection if p not in PROTECTIONS]
        if not self.protection or unknown:
            raise ValueError(
                f"field {self.name}: protection {self.protection} (known {PROTECTIONS})"
            )

    @property
    def sent(self) -> bool:
        return "not-sent" not in self.protection

    def matches(self, name: str) -> bool:
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(self.name))
        return re.fullmatch(pattern, name) is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "protection": list(self.protection),
            "meaning": self.meaning,
        }
        if self.accounting:
            out["accounting"] = self.accounting
        if self.when:
            out["when"] = self.when
        if self.contains:
            out["contains"] = [record.to_dict() for record in self.contains]
        return out


@dataclass(frozen=True)
class Record:
    """One record of a reply's ``RecordDict``."""

    name: str
    kind: Literal["arrays", "metrics", "config"]
    meaning: str
    fields: tuple[Field, ...]
    when: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"record {self.name}: kind {self.kind!r} (known {KINDS})")

    def field_for(self, name: str) -> Field | None:
        """The declaration of the field ``name`` (exact names before patterns), or None."""
        exact = [f for f in self.fields if f.name == name]
        return exact[0] if exact else next((f for f in self.fields if f.matches(name)), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "meaning": self.meaning,
            "fields": [f.to_dict() for f in self.fields],
        }
        if self.when:
            out["when"] = self.when
        return out


@dataclass(frozen=True)
class Reply:
    """One shape of reply to a message type (an update, a decline, a SecAgg+ stage, ...)."""

    message_type: str
    variant: str
    meaning: str
    records: tuple[Record, ...]

    def record(self, name: str) -> Record | None:
        return next((r for r in self.records if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "message_type": self.message_type,
            "variant": self.variant,
            "meaning": self.meaning,
            "records": [r.to_dict() for r in self.records],
        }


@dataclass(frozen=True)
class FlowerItem:
    """Something Flower sends for the node beside the ClientApp's replies."""

    name: str
    when: str
    meaning: str
    fields: tuple[Field, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "when": self.when,
            "meaning": self.meaning,
            "fields": [f.to_dict() for f in self.fields],
        }


@dataclass(frozen=True)
class EgressManifest:
    """What leaves a node with the given settings."""

    settings: dict[str, Any]
    replies: tuple[Reply, ...]
    flower: tuple[FlowerItem, ...]
    notes: tuple[str, ...] = field(default=())
    node: str | None = None  # the node whose settings these are (None: fedtune's defaults)

    def replies_to(self, message_type: str) -> tuple[Reply, ...]:
        return tuple(r for r in self.replies if r.message_type == message_type)

    def reply(self, message_type: str, variant: str) -> Reply:
        for reply in self.replies:
            if (reply.message_type, reply.variant) == (message_type, variant):
                return reply
        raise KeyError(f"no {message_type!r} reply {variant!r} in the manifest")

    def fields(self) -> Iterator[tuple[Reply, Record, Field]]:
        """Every declared field, with its reply and record (nested records included)."""
        for reply in self.replies:
            for record in reply.records:
                yield from _fields(reply, record)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "settings": dict(self.settings),
            "message_types": {name: meaning for name, meaning in MESSAGE_TYPES.items()},
            "replies": [r.to_dict() for r in self.replies],
            "flower": [item.to_dict() for item in self.flower],
            "notes": list(self.notes),
        }


def _fields(reply: Reply, record: Record) -> Iterator[tuple[Reply, Record, Field]]:
    for item in record.fields:
        yield reply, record, item
        for inner in item.contains:
            yield from _fields(reply, inner)


# --- the declarations -------------------------------------------------------------------------

MESSAGE_TYPES = {
    "train": "train the global adapter one private round on the node's data",
    "evaluate": "the global adapter's loss on the node's held-out data",
    ABTEST_MESSAGE_TYPE: "score two model versions on the node's held-out data (A/B test)",
    DESCRIBE_MESSAGE_TYPE: "who the node is and how many training examples it holds",
}

PLAIN = ("plain",)
SIGNED = ("signed-public",)
NOT_SENT = ("not-sent",)
DP_SGD = (
    "DP-SGD (Opacus: Poisson sampling, per-example clipping to privacy.max_grad_norm, Gaussian "
    "noise), accounted in the node's ledger as a training_round entry on the training data set"
)
# Why the cost figures (tokens, device-seconds) go with the other plain figures, never alone.
COST_NOTE = (
    "an operational cost figure for the coordinator's dashboard, not DP. It says more than "
    "what was sent before it: an exact token count is the sum of the examples' lengths, so "
    "with num-examples and the sample rate it gives the training examples' mean length (the "
    "held-out token count was already sent; device-seconds grow with tokens and say about as "
    "much, as train-seconds did). Hence sent only under release_metrics = plain, which "
    "releases figures about the data as computed; never under dp or none"
)
# A/B statistics sent without DP (paired statistics): what each of SUMMARY_FIELDS means.
SUMMARY_MEANINGS = {
    "n": ("int", "examples scored"),
    "sum_a": ("float", "sum of version A's scores"),
    "sum_b": ("float", "sum of version B's scores"),
    "sum_d": ("float", "sum of the differences d = b - a"),
    "sum_d2": ("float", "sum of the squared differences"),
    "b_only": ("int", "examples B got right and A wrong (right/wrong metrics)"),
    "a_only": ("int", "examples A got right and B wrong (right/wrong metrics)"),
}
# A/B statistics a node with release_metrics = "dp" sends, in one Gaussian mechanism.
DP_SUMMARY_FIELDS = ("n", "sum_a", "sum_b", "sum_d2")


def _metric_release(bound: float) -> str:
    return (
        "Gaussian mechanism on per-example values clipped to a stated range (a loss to "
        f"[0, privacy.metric_loss_bound = {bound:g}] nats per token, a reward margin to "
        "[-privacy.metric_margin_bound, +privacy.metric_margin_bound], a held-out prompt's "
        "reward to [0, number of training.grpo_rewards], other A/B scores to "
        "[0, 1]), noise privacy.metric_noise_multiplier times the sensitivity; accounted in the "
        "node's ledger as a metric_release entry (method gaussian) on the held-out data set"
    )


@dataclass(frozen=True)
class _Settings:
    release_metrics: ReleaseMetrics
    secure_aggregation: bool
    clear_updates: bool
    share_per_example_scores: bool
    non_private_updates: bool
    metric_loss_bound: float

    def metric(self, *, needed: bool = False) -> tuple[str, ...]:
        """The protection of a plain figure about the data (a loss, a timing): plain when
        the node releases plain metrics, else not sent (``needed``: sent whatever the policy,
        the coordinator cannot work without it)."""
        if needed or self.release_metrics == "plain":
            return PLAIN
        return NOT_SENT


def _identity_record(*, describe: bool = False) -> Record:
    fields = [
        Field("name", "str", PLAIN, "the node's enrolled name"),
        Field(PROTOCOL_KEY, "str", PLAIN, "the fedtune wire protocol the node speaks"),
        Field("base-model-fingerprint", "str", PLAIN, "SHA-256 of the base model the node holds"),
        Field(
            "data-fingerprint",
            "str",
            PLAIN,
            "SHA-256 of the node's training file, unsalted (names the data set in the ledger; "
            "it changes with any edit, and confirms a guessed copy of the whole file)",
        ),
    ]
    if describe:
        fields.append(
            Field(
                NUM_EXAMPLES,
                "int",
                PLAIN,
                "training examples the node holds: the coordinator sizes secure aggregation's "
                "weights with it (sent under every release_metrics)",
            )
        )
    return Record(NODE, "config", "who the node is", tuple(fields))


def _ledger_record(kind: str, when: str = "") -> Record:
    return Record(
        LEDGER,
        "config",
        f"the node's signed privacy record of this {kind}",
        (
            Field(
                "entry",
                "str (JSON)",
                SIGNED,
                "the signed, hash-chained ledger entry (run, round, data-set fingerprint, "
                "steps, sample rate, noise, clip, delta, epsilon, accountant)",
            ),
            Field(
                "checkpoint",
                "str (JSON)",
                SIGNED,
                "the node's signature over its ledger's new head (seq, head hash)",
            ),
        ),
        when=when,
    )


def _decline_record() -> Record:
    return Record(
        DECLINE,
        "config",
        "why the node will not answer",
        (
            Field(
                "reason",
                "str",
                PLAIN,
                "fedtune's own text: the budget, the protocol, a policy; may state the data "
                "set's epsilon spent and target",
            ),
        ),
    )


def _train_records(settings: _Settings) -> tuple[Record, ...]:
    """The train reply's records other than the arrays (what SecAgg+ packs beside them)."""
    metric = settings.metric()
    local = "round 1 with evaluate-local-model (release_metrics = plain)"
    return (
        Record(
            METRICS,
            "metrics",
            "figures of the round",
            (
                Field(
                    NUM_EXAMPLES,
                    "int",
                    PLAIN,
                    "training examples: FedAvg's weight (sent under every release_metrics)",
                ),
                Field("train-loss", "float", metric, "mean training loss of the round"),
                Field("train-seconds", "float", metric, "time spent training"),
                Field(
                    TRAIN_TOKENS,
                    "int",
                    metric,
                    "tokens the round's training forward passes read (prompt and answer, padding "
                    "excluded; every Poisson-sampled example once per step it joined; under GRPO "
                    "the sampling of each prompt's completions and the reference and policy "
                    "passes over them, about 3 x group size x (prompt + completion) per "
                    "prompt): " + COST_NOTE,
                ),
                Field(
                    TRAIN_DEVICE_SECONDS,
                    "float",
                    metric,
                    "seconds the round's training steps ran on the node's device (CUDA "
                    "synchronised before each clock read): " + COST_NOTE,
                ),
                Field(
                    "held-out-loss-start",
                    "float",
                    metric,
                    "held-out loss of the global adapter received (the baseline)",
                    when=local,
                ),
                Field(
                    "held-out-loss-local",
                    "float",
                    metric,
                    "held-out loss after local training",
                    when="evaluate-local-model (release_metrics = plain)",
                ),
                Field("evaluate-seconds", "float", metric, "time spent on held-out evaluation"),
                Field(
                    EVALUATE_TOKENS,
                    "int",
                    metric,
                    "tokens the message's held-out evaluations read (0 without them): " + COST_NOTE,
                ),
                Field(
                    EVALUATE_DEVICE_SECONDS,
                    "float",
                    metric,
                    "seconds those evaluations ran on the device: " + COST_NOTE,
                ),
                Field(
                    NODE_SECONDS,
                    "float",
                    metric,
                    "the node's whole time on the message (wall time; Flower's "
                    "clientapp_runtime says about as much under every release_metrics)",
                ),
                *(
                    Field(
                        name,
                        "float",
                        metric,
                        f"GRPO round health: {what} of the round's sampled completions",
                        when='training.method = "grpo" (release_metrics = plain)',
                    )
                    for name, what in (
                        ("grpo-mean-reward", "mean reward"),
                        ("grpo-format-share", "share in the <think>/<answer> format"),
                        ("grpo-completion-tokens", "mean length in tokens"),
                        ("grpo-kl", "mean KL per token to the base model"),
                    )
                ),
            ),
        ),
        _identity_record(),
        Record(
            BUDGET,
            "config",
            "the node's plan for its budget (empty without DP)",
            (
                Field("target_epsilon", "float", PLAIN, "the data set's target epsilon"),
                Field("planned_rounds", "int", PLAIN, "rounds the plan spreads it over"),
                Field(
                    "private_rounds_on_data_set",
                    "int",
                    PLAIN,
                    "private rounds trained on this data set so far, this one included",
                ),
                Field(
                    "planned_epsilon",
                    "float",
                    PLAIN,
                    "the epsilon the run's plan expects by this round (for the coordinator's "
                    "ahead-of-plan alert; a function of the target and the round's noise)",
                ),
                Field(
                    "budget_group",
                    "list[str]",
                    PLAIN,
                    "the fingerprints of the other data sets that share this one's budget "
                    "(data.shares_budget_with), for the dashboard's budget groups",
                    when="data.shares_budget_with is set",
                ),
                Field(
                    "group_epsilon",
                    "float",
                    PLAIN,
                    "the group's epsilon after the round as the budget guard counted it (a "
                    "function of the group's ledger entries)",
                    when="data.shares_budget_with is set",
                ),
            ),
        ),
        _ledger_record("round (kind training_round)"),
    )


def _adapter_fields(settings: _Settings, protection: tuple[str, ...]) -> tuple[Field, ...]:
    """The adapter as it travels: every tensor's values in one vector, and their layout."""
    if settings.non_private_updates:
        accounting = ""
        meaning = (
            "the LoRA tensors after local training WITHOUT differential privacy (privacy.mode "
            '= "non-private" and allow_non_private_updates): no guarantee'
        )
    else:
        accounting = DP_SGD
        meaning = "the LoRA tensors after the round's DP-SGD (every adapter tensor, trained or not)"
    return (
        Field(
            VECTOR_KEY,
            "float32 array",
            protection,
            meaning + ", their values one after another (float16 with upload float16)",
            accounting=accounting,
        ),
        Field(
            LAYOUT_KEY,
            "uint8 array",
            PLAIN,
            "the tensors' names, shapes and number type as JSON: fixed by the base model and "
            "the run's LoRA settings, the same on every node",
        ),
    )


def _train_replies(settings: _Settings) -> tuple[Reply, ...]:
    update_protection = PLAIN if settings.non_private_updates else ("dp",)
    decline = Reply(
        "train",
        "decline",
        "the node will not train (budget, protocol, policy; a deployed node requiring secure "
        "aggregation declines a train message in the clear)",
        (_identity_record(), _decline_record()),
    )
    update = Reply(
        "train",
        "update",
        "the adapter after one private round, in the clear (no secure aggregation)",
        (
            Record(
                ARRAYS,
                "arrays",
                "the adapter's tensors, packed (one vector and its layout)",
                _adapter_fields(settings, update_protection),
            ),
            *_train_records(settings),
        ),
    )
    clear = (update,) if settings.clear_updates else ()
    if not settings.secure_aggregation:
        return (*clear, decline)
    masked = ("masked", *(() if settings.non_private_updates else ("dp",)))
    stage = "SecAgg+ stage"
    configs = RECORD_KEY_CONFIGS
    return (
        Reply(
            "train",
            f"{stage} setup",
            "the node's two public keys for this round, signed with its ledger key",
            (
                Record(
                    configs,
                    "config",
                    "Flower's SecAgg+ reply",
                    (
                        Field(Key.PUBLIC_KEY_1, "bytes", PLAIN, "public key for pairwise masks"),
                        Field(Key.PUBLIC_KEY_2, "bytes", PLAIN, "public key to encrypt shares"),
                    ),
                ),
                Record(
                    KEY_SIGNATURE_RECORD,
                    "config",
                    "fedtune: the node's signature of its keys for this run and round",
                    (Field("signature", "str", SIGNED, "Ed25519 signature (the ledger key)"),),
                    when="a deployed node (it has an enrollment certificate)",
                ),
            ),
        ),
        Reply(
            "train",
            f"{stage} share_keys",
            "shares of the node's secrets, each encrypted for one peer",
            (
                Record(
                    configs,
                    "config",
                    "Flower's SecAgg+ reply",
                    (
                        Field(Key.DESTINATION_LIST, "list[int]", PLAIN, "peer node ids"),
                        Field(
                            Key.CIPHERTEXT_LIST,
                            "list[bytes]",
                            PLAIN,
                            "Shamir shares of the mask seed and key, encrypted for each peer "
                            "(opaque to the coordinator)",
                        ),
                    ),
                ),
            ),
        ),
        Reply(
            "train",
            f"{stage} collect_masked_vectors",
            "the masked update, with fedtune's train reply (all but the arrays) beside it",
            (
                Record(
                    configs,
                    "config",
                    "Flower's SecAgg+ reply",
                    (
                        Field(
                            Key.MASKED_PARAMETERS,
                            "list[bytes]",
                            masked,
                            "the adapter's tensors, weighted, quantised and masked, in the "
                            "fewest bytes the modulus needs (uint32 for 2**32, 3 bytes a value "
                            "for 2**24): only the round's sum unmasks",
                            accounting="" if settings.non_private_updates else DP_SGD,
                        ),
                    ),
                ),
                Record(
                    FITRES_PARAMETERS,
                    "arrays",
                    "emptied by Flower's mod: the arrays travel masked",
                    (),
                ),
                Record(
                    FITRES_NUM_EXAMPLES,
                    "metrics",
                    "the update's weight, in the clear",
                    (
                        Field(
                            "num_examples",
                            "int",
                            PLAIN,
                            "training examples (FedAvg's weight; 0 for a decline, 1 under "
                            "node-level DP)",
                        ),
                    ),
                ),
                Record(
                    FITRES_METRICS,
                    "config",
                    "fedtune's train reply without its arrays, in the clear",
                    (
                        Field(
                            REPLY_KEY,
                            "bytes (RecordDict)",
                            PLAIN,
                            "the train reply's other records, each as declared inside",
                            contains=(*_train_records(settings), _decline_record()),
                        ),
                        Field(MASK_GENERATOR_KEY, "str", PLAIN, "the mask generator's name"),
                    ),
                ),
                Record(
                    FITRES_STATUS,
                    "config",
                    "Flower's status of the fit",
                    (
                        Field("code", "int", PLAIN, "0 (OK)"),
                        Field("message", "str", PLAIN, '"Success"'),
                    ),
                ),
            ),
        ),
        Reply(
            "train",
            f"{stage} unmask",
            "shares that let the coordinator remove the masks of the round's sum",
            (
                Record(
                    configs,
                    "config",
                    "Flower's SecAgg+ reply",
                    (
                        Field(Key.NODE_ID_LIST, "list[int]", PLAIN, "the nodes the shares are of"),
                        Field(
                            Key.SHARE_LIST,
                            "list[bytes]",
                            PLAIN,
                            "a share of each survivor's mask seed and each dropped node's key "
                            "(below the threshold they reveal nothing)",
                        ),
                    ),
                ),
            ),
        ),
        *clear,
        decline,
    )


def _evaluate_replies(settings: _Settings) -> tuple[Reply, ...]:
    policy = settings.release_metrics
    if policy == "dp":
        dp = ("dp",)
        accounting = _metric_release(settings.metric_loss_bound)
        fields: tuple[Field, ...] = (
            Field(
                NUM_EXAMPLES,
                "int",
                dp,
                "held-out examples (the noisy count, rounded)",
                accounting=accounting,
            ),
            Field("held-out-loss", "float", dp, "noisy mean held-out loss", accounting=accounting),
            Field(
                "held-out-perplexity",
                "float",
                dp,
                "exp of the noisy loss (computed from the release: no further cost)",
                accounting=accounting,
            ),
            Field(
                "held-out-loss-noise",
                "float",
                dp,
                "the noise's standard deviation on the loss (from the settings and the noisy "
                "count)",
                accounting=accounting,
            ),
            Field("held-out-tokens", "int", NOT_SENT, "held-out assistant tokens"),
            Field("evaluate-seconds", "float", NOT_SENT, "time spent evaluating"),
            Field(EVALUATE_TOKENS, "int", NOT_SENT, "tokens the evaluation read: " + COST_NOTE),
            Field(
                EVALUATE_DEVICE_SECONDS,
                "float",
                NOT_SENT,
                "seconds the evaluation ran on the device: " + COST_NOTE,
            ),
            Field(NODE_SECONDS, "float", NOT_SENT, "the node's whole time on the message"),
            *_preference_fields(NOT_SENT),
        )
        meaning = (
            "held-out figures through one Gaussian mechanism; past the data set's cap the "
            "metrics record is empty and no ledger record is sent"
        )
        records: tuple[Record, ...] = (
            Record(METRICS, "metrics", "the released figures", fields),
            _identity_record(),
            _ledger_record("release (kind metric_release)", when="a release was made"),
        )
    else:
        metric = settings.metric()
        fields = (
            Field(NUM_EXAMPLES, "int", metric, "held-out examples evaluated"),
            Field("held-out-loss", "float", metric, "mean held-out loss per assistant token"),
            Field("held-out-perplexity", "float", metric, "exp of the held-out loss"),
            Field("held-out-tokens", "int", metric, "held-out assistant tokens"),
            Field("evaluate-seconds", "float", metric, "time spent evaluating"),
            Field(
                EVALUATE_TOKENS,
                "int",
                metric,
                "tokens the evaluation read (prompt and answer, padding excluded): " + COST_NOTE,
            ),
            Field(
                EVALUATE_DEVICE_SECONDS,
                "float",
                metric,
                "seconds the evaluation ran on the node's device (CUDA synchronised before "
                "each clock read): " + COST_NOTE,
            ),
            Field(
                NODE_SECONDS, "float", metric, "the node's whole time on the message (wall time)"
            ),
            *_preference_fields(metric),
        )
        meaning = (
            "held-out figures as computed"
            if policy == "plain"
            else "an empty metrics record (release_metrics = none)"
        )
        records = (Record(METRICS, "metrics", "held-out figures", fields), _identity_record())
    return (Reply("evaluate", "metrics", meaning, records),)


def _preference_fields(protection: tuple[str, ...]) -> tuple[Field, ...]:
    when = "the held-out file holds preference pairs"
    return (
        Field(HELD_OUT_PAIRS, "int", protection, "held-out preference pairs scored", when=when),
        Field(
            PREFERENCE_ACCURACY,
            "float",
            protection,
            "share of those pairs whose implicit DPO reward prefers the chosen answer",
            when=when,
        ),
        Field(
            REWARD_MARGIN,
            "float",
            protection,
            "mean implicit reward of the chosen answer minus the rejected one's",
            when=when,
        ),
    )


def _abtest_replies(settings: _Settings) -> tuple[Reply, ...]:
    note = Record(
        ABTEST,
        "config",
        "the node's note on what it shared",
        (
            Field("per-example", "bool", PLAIN, "whether the scores are per example"),
            Field(
                "examples",
                "int",
                ("dp",) if settings.release_metrics == "dp" else PLAIN,
                "held-out examples scored"
                + (" (the noisy count, rounded)" if settings.release_metrics == "dp" else ""),
                accounting=_metric_release(settings.metric_loss_bound)
                if settings.release_metrics == "dp"
                else "",
            ),
            Field("dp", "bool", PLAIN, "the statistics were released under DP", when="dp"),
        ),
    )
    decline = Reply(
        ABTEST_MESSAGE_TYPE,
        "decline",
        "the node does not score A/B tests (release_metrics = none), a DP release would "
        "pass the data set's cap, its held-out file lacks what a metric scores (preference "
        "pairs, GRPO prompts), or the message's settings are refused (e.g. its DPO beta)",
        (_identity_record(), _decline_record()),
    )
    if settings.release_metrics == "none":
        return (decline,)
    if settings.release_metrics == "dp":
        dp = ("dp",)
        accounting = _metric_release(settings.metric_loss_bound)
        noisy = [
            Field(
                f"{{metric}}/{name}",
                "float",
                dp,
                f"noisy {SUMMARY_MEANINGS[name][1]}",
                accounting=accounting,
            )
            for name in DP_SUMMARY_FIELDS
        ]
        noise = Field(
            "{metric}/noise-sd",
            "float",
            dp,
            "the noise's standard deviation on each sum (from the settings)",
            accounting=accounting,
        )
        fields = (*noisy, noise)
        return (
            Reply(
                ABTEST_MESSAGE_TYPE,
                "paired statistics (DP)",
                "per metric, paired statistics released in one Gaussian mechanism",
                (
                    Record(SCORES, "metrics", "noisy paired statistics per metric", fields),
                    note,
                    _identity_record(),
                    _ledger_record("release (kind metric_release)"),
                ),
            ),
            decline,
        )
    if settings.share_per_example_scores:
        scores = Record(
            SCORES,
            "metrics",
            "one score per held-out example and version, in the same order",
            (
                Field("{metric}/a", "list[float]", PLAIN, "version A's score on each example"),
                Field("{metric}/b", "list[float]", PLAIN, "version B's score on each example"),
            ),
        )
        variant, meaning = "per-example scores", "scores per example (never text)"
    else:
        scores = Record(
            SCORES,
            "metrics",
            "paired statistics per metric (evaluation.share_per_example_scores = false)",
            tuple(
                Field(
                    f"{{metric}}/{name}",
                    SUMMARY_MEANINGS[name][0],
                    PLAIN,
                    SUMMARY_MEANINGS[name][1],
                )
                for name in SUMMARY_FIELDS
            ),
        )
        variant, meaning = "paired statistics", "paired statistics per metric (never text)"
    return (Reply(ABTEST_MESSAGE_TYPE, variant, meaning, (scores, note, _identity_record())),)


def _describe_replies() -> tuple[Reply, ...]:
    return (
        Reply(
            DESCRIBE_MESSAGE_TYPE,
            "identity",
            "who the node is; loads the model, so the node is warm afterwards",
            (_identity_record(describe=True),),
        ),
    )


def _error_reply() -> Reply:
    return Reply(
        "any",
        "error",
        "Flower's error reply in place of an answer, when the node's code raises (or a "
        "secure-aggregation or run-bundle check refuses)",
        (
            Record(
                "error",
                "config",
                "Flower's Error (no records: the message's error field)",
                (
                    Field(
                        "code",
                        "int",
                        PLAIN,
                        "Flower's ErrorCode (e.g. CLIENT_APP_RAISED_EXCEPTION)",
                    ),
                    Field(
                        "reason",
                        "str",
                        PLAIN,
                        "the exception's type; the text only for fedtune's own errors, which "
                        "name files, lines and keys, never a data row (tested); another "
                        "library's text stays in the node's log",
                    ),
                ),
            ),
        ),
    )


FLOWER_TRAFFIC: tuple[FlowerItem, ...] = (
    FlowerItem(
        "message metadata",
        "with every reply",
        "Flower's envelope of a reply",
        tuple(
            Field(name, kind, PLAIN, meaning)
            for name, kind, meaning in (
                ("run_id", "int", "the run"),
                ("message_id", "str", "the reply's id (a hash of its content)"),
                ("src_node_id", "int", "this node's Flower id"),
                ("dst_node_id", "int", "the coordinator (0)"),
                ("reply_to_message_id", "str", "the message answered"),
                ("group_id", "str", "the round"),
                ("created_at", "float", "when the reply was made (Unix time)"),
                ("ttl", "float", "the time left to live of the message answered"),
                ("message_type", "str", "the message type answered"),
            )
        ),
    ),
    FlowerItem(
        "PushMessages",
        "with every reply",
        "the SuperNode's upload of a reply (its content follows as content-addressed objects)",
        (
            Field(
                "clientapp_runtime",
                "float",
                PLAIN,
                "seconds the ClientApp took on the message: a timing sent whatever "
                "release_metrics says",
            ),
            Field("message_object_trees", "object ids", PLAIN, "hashes of the reply's parts"),
        ),
    ),
    FlowerItem(
        "SendNodeHeartbeat",
        f"about every {HEARTBEAT_EVERY_S:g} s while the node runs",
        "the node is alive",
        (
            Field("node_id", "int", PLAIN, "this node's Flower id"),
            Field("heartbeat_interval", "float", PLAIN, f"{HEARTBEAT_INTERVAL_S:g} s"),
        ),
    ),
    FlowerItem(
        "ActivateNode / DeactivateNode",
        "when the SuperNode connects and stops",
        "the node comes online and goes offline",
        (
            Field("public_key", "bytes", PLAIN, "the node's enrolled ECDSA key (auth_key.pub)"),
            Field("heartbeat_interval", "float", PLAIN, f"{HEARTBEAT_INTERVAL_S:g} s"),
        ),
    ),
    FlowerItem(
        "PullMessages, GetRun, GetFab, PullObject, ConfirmMessageReceived",
        "while polling for and receiving messages",
        "requests naming the node, the run, the bundle hash and object ids; no data",
        (Field("node_id", "int", PLAIN, "this node's Flower id"),),
    ),
    FlowerItem(
        "request headers",
        "on every Fleet API request",
        "authentication and version (over TLS)",
        (
            Field("flwr-public-key", "str", PLAIN, "the node's ECDSA public key"),
            Field("flwr-timestamp", "str", PLAIN, "the request's time"),
            Field("flwr-signature", "str", SIGNED, "the node's signature of the timestamp"),
            Field("version", "str", PLAIN, "Flower's package name, version and component"),
        ),
    ),
)

NOTES = (
    "A task's status and details (the ClientApp's error text too) go to the SuperNode on "
    "the node's loopback and stay on the node; the coordinator sees the error reply.",
    "Logs stay on the node: Flower's ClientApp logs go to the local SuperNode only.",
)


def egress_manifest(
    *,
    release_metrics: str = "plain",
    secure_aggregation: bool = False,
    clear_updates: bool | None = None,
    share_per_example_scores: bool = True,
    non_private_updates: bool = False,
    metric_loss_bound: float = 5.0,
) -> EgressManifest:
    """What a node with these settings sends: ``release_metrics`` (privacy.release_metrics),
    ``secure_aggregation`` (the node answers SecAgg+ rounds: a deployed node),
    ``clear_updates`` (it also sends updates in the clear; default: without secure
    aggregation only, as a deployed node with coordinator.require_secure_aggregation),
    ``share_per_example_scores``
    (evaluation.share_per_example_scores), ``non_private_updates`` (privacy.mode =
    "non-private" with allow_non_private_updates) and ``metric_loss_bound``
    (privacy.metric_loss_bound)."""
    if release_metrics not in RELEASE_METRICS:
        raise ValueError(
            f"release_metrics must be one of {RELEASE_METRICS}, not {release_metrics!r}"
        )
    settings = _Settings(
        release_metrics=release_metrics,
        secure_aggregation=secure_aggregation,
        clear_updates=not secure_aggregation if clear_updates is None else clear_updates,
        share_per_example_scores=share_per_example_scores,
        non_private_updates=non_private_updates,
        metric_loss_bound=metric_loss_bound,
    )
    notes = list(NOTES)
    if release_metrics == "none":
        notes.insert(
            0,
            "release_metrics = none: still sent are the training-set size (train reply "
            f"{NUM_EXAMPLES}, FedAvg's weight; describe reply {NUM_EXAMPLES}, secure "
            "aggregation's weights), the ledger entries (whose sample rate implies it too) "
            "and Flower's ClientApp run time.",
        )
    elif release_metrics == "dp":
        notes.insert(
            0,
            "release_metrics = dp: the train reply's only metric is the training-set size "
            f"({NUM_EXAMPLES}, FedAvg's weight); Flower's ClientApp run time is sent as well.",
        )
    return EgressManifest(
        settings={
            "release_metrics": release_metrics,
            "secure_aggregation": secure_aggregation,
            "clear_updates": settings.clear_updates,
            "share_per_example_scores": share_per_example_scores,
            "non_private_updates": non_private_updates,
            "metric_loss_bound": metric_loss_bound,
        },
        replies=(
            *_train_replies(settings),
            *_evaluate_replies(settings),
            *_abtest_replies(settings),
            *_describe_replies(),
            _error_reply(),
        ),
        flower=FLOWER_TRAFFIC,
        notes=tuple(notes),
    )


def node_manifest(config: Any) -> EgressManifest:
    """The manifest of the node a :class:`~fedtune.platform.config.NodeConfig` describes."""
    privacy = config.privacy
    connection = config.coordinator
    manifest = egress_manifest(
        release_metrics=privacy.release_metrics,
        secure_aggregation=connection is not None,  # a deployed node answers SecAgg+ rounds
        clear_updates=connection is None or not connection.require_secure_aggregation,
        share_per_example_scores=config.evaluation.share_per_example_scores,
        non_private_updates=privacy.mode == "non-private" and privacy.allow_non_private_updates,
        metric_loss_bound=privacy.metric_loss_bound,
    )
    return replace(manifest, node=config.node.name)


# --- tables and text --------------------------------------------------------------------------


def field_rows(records: Any, *, prefix: str = "") -> list[dict[str, str]]:
    """One row per field of ``records`` (a reply's or a Flower item's, as :meth:`to_dict`
    gives them): record, kind, field, type, protection, meaning, when / accounting; a field
    that carries records is followed by theirs, named ``RECORD.FIELD > INNER``."""
    rows = []
    for record in records:
        for item in record.get("fields", ()):
            notes = [f"when: {item['when']}"] if item.get("when") else []
            notes += [f"accounting: {item['accounting']}"] if item.get("accounting") else []
            rows.append(
                {
                    "record": f"{prefix}{record.get('name', '')}",
                    "kind": str(record.get("kind", "")),
                    "field": str(item["name"]),
                    "type": str(item["type"]),
                    "protection": " + ".join(item["protection"]),
                    "meaning": str(item["meaning"]),
                    "when / accounting": "; ".join(notes),
                }
            )
            inner = f"{prefix}{record.get('name')}.{item['name']} > "
            rows += field_rows(item.get("contains", ()), prefix=inner)
    return rows


def format_manifest(manifest: EgressManifest | dict[str, Any]) -> str:
    """The manifest as text for a terminal (from the manifest or its :meth:`to_dict`)."""
    data = manifest.to_dict() if isinstance(manifest, EgressManifest) else manifest
    settings = ", ".join(f"{key} = {value}" for key, value in data["settings"].items())
    who = f"node {data['node']}" if data.get("node") else "a node with fedtune's default settings"
    lines = [f"What leaves {who} ({settings})", ""]
    for reply in data["replies"]:
        title = reply["message_type"]
        lines.append(f"{title} — {reply['variant']}: {reply['meaning']}")
        for record in reply["records"]:
            lines += _record_lines(record, indent="  ")
        lines.append("")
    lines.append("Sent by Flower beside the replies")
    for item in data["flower"]:
        lines.append(f"  {item['name']} ({item['when']}): {item['meaning']}")
        lines += [_field_line(f, indent="    ") for f in item["fields"]]
    if data["notes"]:
        lines += ["", "Notes"] + [f"  - {note}" for note in data["notes"]]
    return "\n".join(lines)


def _record_lines(record: dict[str, Any], *, indent: str) -> list[str]:
    when = f" [when: {record['when']}]" if record.get("when") else ""
    lines = [f"{indent}{record['name']} ({record['kind']}): {record['meaning']}{when}"]
    for item in record["fields"]:
        lines.append(_field_line(item, indent=indent + "  "))
        for inner in item.get("contains", ()):
            lines += _record_lines(inner, indent=indent + "    ")
    return lines


def _field_line(item: dict[str, Any], *, indent: str) -> str:
    protection = " + ".join(item["protection"])
    line = f"{indent}{item['name']}: {item['type']}, {protection} — {item['meaning']}"
    if item.get("when"):
        line += f" [when: {item['when']}]"
    if item.get("accounting"):
        line += f" [accounting: {item['accounting']}]"
    return line
