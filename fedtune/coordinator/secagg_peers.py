"""The grid Flower's SecAgg+ workflow talks through: it relays each node's signed SecAgg+
public keys with the node's enrollment certificate.

Flower's workflow keeps only the two public keys of a node's setup reply and forwards them,
unsigned, in the share-keys stage. Deployed nodes sign their keys and accept a peer's keys only
with that signature and the peer's enrollment certificate (``client_node/secagg_guard.py``,
:mod:`fedtune.platform.security.enrollment_certificates`). This grid takes the signatures
from the setup replies and adds, to each share-keys message, ``[certificate, signature]`` for
every node in its key list. It vouches for nothing itself: what it relays is checked by each node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtune.coordinator.roster import EnrolledGrid
from fedtune.platform.security.enrollment_certificates import KEY_SIGNATURE_RECORD, PEERS_RECORD


class SignedKeyRelay(Grid):
    """``grid``, relaying signed SecAgg+ keys and the enrollment certificates (by enrolled
    name) of the nodes that signed them."""

    def __init__(self, grid: EnrolledGrid, certificates: Mapping[str, str]) -> None:
        self.grid = grid
        self.certificates = certificates
        self.signatures: dict[int, bytes] = {}  # node id -> its signature of this round's keys

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        stages = {_stage(message) for message in messages}
        if Stage.SETUP in stages:
            self.signatures.clear()
        for message in messages:
            if _stage(message) == Stage.SHARE_KEYS:
                self._add_proofs(message)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if Stage.SETUP in stages:
            for reply in replies:
                signed = reply.content.config_records.get(KEY_SIGNATURE_RECORD)
                if not reply.has_error() and signed is not None:
                    signature = signed.get("signature")
                    if isinstance(signature, str):
                        self.signatures[reply.metadata.src_node_id] = signature.encode("ascii")
        return replies

    def _add_proofs(self, message: Message) -> None:
        configs = message.content.config_records[RECORD_KEY_CONFIGS]
        proofs = ConfigRecord()
        for entry in configs:
            if entry == Key.STAGE:
                continue
            name = self.grid.enrolled_name(entry)
            certificate = self.certificates.get(name) if name is not None else None
            signature = self.signatures.get(int(entry))
            if certificate is not None and signature is not None:
                proofs[entry] = [certificate.encode("utf-8"), signature]
        message.content.config_records[PEERS_RECORD] = proofs

    # -- the rest is the wrapped grid's ----------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)


def _stage(message: Message) -> str | None:
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    return stage if isinstance(stage, str) else None
