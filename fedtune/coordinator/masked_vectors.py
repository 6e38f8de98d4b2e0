"""The grid Flower's SecAgg+ workflow talks through: it refuses a node's masked update that
cannot go into the secure sum before the workflow adds it.

Flower's ``collect_masked_vectors_stage`` loads each node's masked arrays and adds them as
they come: a float array makes its modulo (``&``) raise and halts the round for every node, a
wrong shape is broadcast over the sum, and an array of another integer type changes what the
sum wraps around. This grid remembers the modulus of the round (from the setup messages it
sends) and the shapes it sends with each node's train message, and turns a reply whose
masked vectors are not of :func:`fedtune.platform.wire.masked_upload.upload_dtype`, of those
shapes, within ``[0, mod_range)`` into an error reply from that node (and widens three-byte
values to the uint32 the workflow sums). The workflow then treats
the node as one that dropped out: its pairwise masks are rebuilt from its peers' shares and
taken off, and the mean is that of the others (if enough stayed); ``SecureFedAvg`` records the
node as failed with the reason.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid

from fedtune.coordinator.grid_wrapper import WrappedGrid, secaggplus_stage
from fedtune.platform.wire.masked_upload import masked_vector_problem, widened

LOGGER = logging.getLogger(__name__)
FITINS_PARAMETERS = "fitins.parameters"  # where Flower's workflow puts the arrays it sends


class MaskedVectorCheck(WrappedGrid):
    """``grid``, refusing masked updates the secure sum cannot take."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.mod_range: int | None = None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        shapes: dict[int, list[tuple[int, ...]]] = {}
        for message in messages:
            stage = secaggplus_stage(message)
            if stage == Stage.SETUP:
                configs = message.content.config_records[RECORD_KEY_CONFIGS]
                self.mod_range = int(configs[Key.MOD_RANGE])  # type: ignore[arg-type]
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                shapes[message.metadata.dst_node_id] = _sent_shapes(message)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if not shapes:
            return replies
        return [self._checked(reply, shapes) for reply in replies]

    def _checked(self, reply: Message, shapes: dict[int, list[tuple[int, ...]]]) -> Message:
        node = reply.metadata.src_node_id
        if reply.has_error() or node not in shapes:
            return reply
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if self.mod_range is None:
            problem: str | None = "no modulus was set up for this round"
        elif configs is None:
            problem = "its reply carries no SecAgg+ record"
        else:
            blobs = configs.get(Key.MASKED_PARAMETERS)
            problem = masked_vector_problem(blobs, mod_range=self.mod_range, shapes=shapes[node])
            if problem is None:
                return _widened(reply, configs, self.mod_range)
        reason = f"masked update of node {node} refused: {problem}"
        LOGGER.warning("%s", reason)
        # The reply's own metadata (sender, reply-to id): Flower's keyword for that is not in
        # its public overloads.
        error = Error(ErrorCode.UNKNOWN, reason)
        return Message(metadata=reply.metadata, error=error)  # type: ignore[call-overload]


def _sent_shapes(message: Message) -> list[tuple[int, ...]]:
    """The masked arrays a node owes for ``message``: the weight factor's, then one per array
    sent (Flower's ``factor_combine``)."""
    record = message.content.array_records.get(FITINS_PARAMETERS)
    arrays = list(record.values()) if record is not None else []
    return [(1,), *(_shape(array) for array in arrays)]


def _shape(array: Array) -> tuple[int, ...]:
    """An array's shape; legacy ``Parameters`` records it only in the ``.npy`` header of the
    bytes (read without loading the values)."""
    if array.shape:
        return tuple(int(d) for d in array.shape)
    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, _ = read(stream)
    return tuple(int(d) for d in shape)


def _widened(reply: Message, configs: ConfigRecord, mod_range: int) -> Message:
    """``reply``, with three-byte masked values as the uint32 arrays Flower's workflow sums
    (a new message: the node's reply stays as it came)."""
    blobs = configs[Key.MASKED_PARAMETERS]
    wide = widened(blobs, mod_range)  # type: ignore[arg-type]
    if wide is blobs:
        return reply
    content = RecordDict(dict(reply.content.items()))
    content[RECORD_KEY_CONFIGS] = ConfigRecord({**configs, Key.MASKED_PARAMETERS: wide})
    return Message(content=content, metadata=reply.metadata)  # type: ignore[call-overload]
