"""Train messages in the shape Flower's SecAgg+ needs, and back.

Flower runs SecAgg+ only through its workflow API, which speaks the older FitIns/FitRes
records (``fitins.parameters``, ``fitres.metrics``, ...): arrays travel as an ordered list and
the reply's metrics may hold only scalars. The coordinator unmasks only the weighted mean of
the arrays; each node's ``fitres.metrics`` reaches it unmasked. So a secure train message
carries fedtune's :class:`~fedtune.platform.wire.messages.TrainInstructions` and the adapter's
layout as scalars and the whole adapter as one vector (one Flower object, not one per tensor:
packed_arrays.py), a node masks and replies one vector in the same layout, and its reply packs
everything of fedtune's train reply except the arrays (metrics, identity, privacy report,
signed ledger entry, or a decline) into one serialised record. A node that declines sends
zeros with weight 0, which leaves the weighted mean unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedtune.common.errors import FedtuneError
from fedtune.platform.wire.messages import (
    ARRAYS,
    CONFIG,
    DECLINE,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TrainInstructions,
    arrays_to_record,
    record_to_arrays,
)
from fedtune.platform.wire.packed_arrays import ArrayLayout, PackedArraysError
from fedtune.platform.wire.secagg_masks import GENERATOR_NAME

INSTRUCTIONS_KEY = "fedtune-instructions"  # TrainInstructions' record, as JSON
ADAPTER_LAYOUT_KEY = "fedtune-adapter-layout"  # names and shapes in the vector, as JSON
REPLY_KEY = "fedtune-reply"  # the train reply without its arrays, serialised
CLIPPING_NORM_KEY = "fedtune-node-dp-clipping-norm"  # node-level DP: clip the update to this
# Which mask generator masked (node) and unmasks (coordinator): both must be the same, or the
# masks do not cancel and the mean is silently wrong (fedtune.platform.wire.secagg_masks).
MASK_GENERATOR_KEY = "fedtune-mask-generator"
MAX_REPLY_BYTES = 1 << 20  # a reply's non-array part is a few kilobytes


class SecureMessageError(FedtuneError, ValueError):
    """A secure-aggregation train message or reply that does not have fedtune's shape."""


def secure_train_config(
    instructions: TrainInstructions,
    *,
    server_round: int,
    layout: ArrayLayout,
    clipping_norm: float | None = None,
) -> dict[str, bool | bytes | float | int | str]:
    """The FitIns config of a secure train message whose one array is the adapter flattened
    in ``layout`` (``clipping_norm``: node-level DP)."""
    config: dict[str, bool | bytes | float | int | str] = {
        INSTRUCTIONS_KEY: json.dumps(dict(instructions.to_record())),
        ADAPTER_LAYOUT_KEY: layout.to_json(),
        SERVER_ROUND: server_round,
        MASK_GENERATOR_KEY: GENERATOR_NAME,
    }
    if clipping_norm is not None:
        config[CLIPPING_NORM_KEY] = clipping_norm
    return config


@dataclass(frozen=True)
class SecureTrain:
    """A secure train message as the node reads it."""

    content: RecordDict  # fedtune's train content: arrays by name + instructions
    layout: ArrayLayout  # the layout to reply in
    clipping_norm: float | None  # node-level DP: clip the update to this L2 norm
    mask_generator: str  # the coordinator's mask generator ("" when it named none)

    @property
    def sent(self) -> dict[str, np.ndarray]:
        return record_to_arrays(self.content.array_records[ARRAYS])


def train_content_from_secure(content: RecordDict) -> SecureTrain:
    """What a secure train message asks of the node."""
    fitins: FitIns = recorddict_to_fitins(content, keep_input=True)
    try:
        layout = ArrayLayout.from_json(str(fitins.config[ADAPTER_LAYOUT_KEY]))
        record = ConfigRecord(json.loads(str(fitins.config[INSTRUCTIONS_KEY])))
    except (KeyError, json.JSONDecodeError) as exc:
        raise SecureMessageError(f"secure train message lacks fedtune's config ({exc})") from None
    except PackedArraysError as exc:
        raise SecureMessageError(f"secure train message: {exc}") from None
    vectors = parameters_to_ndarrays(fitins.parameters)
    if len(vectors) != 1 or vectors[0].dtype.name != layout.dtype:
        raise SecureMessageError(
            f"{len(vectors)} arrays sent; the adapter travels as one {layout.dtype} vector"
        )
    try:
        arrays = layout.split(vectors[0])
    except PackedArraysError as exc:
        raise SecureMessageError(f"secure train message: {exc}") from None
    record[SERVER_ROUND] = int(fitins.config[SERVER_ROUND])
    train = RecordDict({ARRAYS: arrays_to_record(arrays), CONFIG: record})
    clipping = fitins.config.get(CLIPPING_NORM_KEY)
    return SecureTrain(
        train,
        layout,
        float(clipping) if isinstance(clipping, (int, float)) else None,
        str(fitins.config.get(MASK_GENERATOR_KEY, "")),
    )


def secure_reply_from_train_reply(reply: RecordDict, request: SecureTrain) -> RecordDict:
    """The FitRes content a node hands to ``secaggplus_mod``: its arrays as one vector in the
    request's layout and the rest of ``reply`` serialised in the metrics. A decline sends
    zeros with weight 0. Under node-level DP the update (reply - sent) is clipped first (its
    norm over the whole vector, as over all arrays) and every node weighs 1."""
    rest = RecordDict({key: value for key, value in reply.items() if key != ARRAYS})
    layout = request.layout
    if DECLINE in reply.config_records:
        vector = np.zeros(layout.size, dtype=layout.dtype)
        weight = 0
    else:
        vector = layout.flatten(record_to_arrays(reply.array_records[ARRAYS]))
        weight = int(reply.metric_records[METRICS][NUM_EXAMPLES])  # type: ignore[arg-type]
        if request.clipping_norm is not None:
            clipped = [vector]  # Flower's helper replaces the list's items
            sent = [layout.flatten(request.sent)]
            compute_clip_model_update(clipped, sent, request.clipping_norm)
            vector, weight = clipped[0], 1
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([vector]),
        num_examples=weight,
        metrics={
            REPLY_KEY: recorddict_to_proto(rest).SerializeToString(),
            MASK_GENERATOR_KEY: GENERATOR_NAME,
        },
    )
    return fitres_to_recorddict(fitres, keep_input=False)


def mask_generator_problem(metrics: Mapping[str, object]) -> str | None:
    """Why a node's masked update cannot be unmasked here (another generator), or None."""
    used = metrics.get(MASK_GENERATOR_KEY)
    if used != GENERATOR_NAME:
        return (
            f"masked with the generator {used or 'of stock Flower'!s}; this coordinator unmasks "
            f"with {GENERATOR_NAME}: the masks cannot cancel"
        )
    return None


def train_reply_from_secure_metrics(metrics: Mapping[str, object]) -> RecordDict:
    """The coordinator's view of one node's secure train reply: everything but the arrays."""
    packed = metrics.get(REPLY_KEY)
    if not isinstance(packed, bytes):
        raise SecureMessageError(f"the reply carries no '{REPLY_KEY}' record")
    if len(packed) > MAX_REPLY_BYTES:
        raise SecureMessageError(f"the reply's record is {len(packed)} bytes, over the limit")
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(packed)
        content = recorddict_from_proto(proto)
    except Exception as exc:  # protobuf raises DecodeError and others on garbage
        raise SecureMessageError(f"the reply's record cannot be read ({exc})") from None
    if content.array_records:
        raise SecureMessageError("the reply's record carries arrays outside secure aggregation")
    return content
