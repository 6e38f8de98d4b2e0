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

from flwr.app import ConfigRecord, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtune.coordinator.grid_wrapper import WrappedGrid, secaggplus_stage
from fedtune.coordinator.roster import EnrolledGrid
from fedtune.platform.security.enrollment_certificates import KEY_SIGNATURE_RECORD, PEERS_RECORD


class SignedKeyRelay(WrappedGrid):
    """``grid``, relaying signed SecAgg+ keys and the enrollment certificates (by enrolled
    name) of the nodes that signed them."""

    def __init__(self, grid: EnrolledGrid, certificates: Mapping[str, str]) -> None:
        super().__init__(grid)
        self.grid: EnrolledGrid = grid
        self.certificates = certificates
        self.signatures: dict[int, bytes] = {}  # node id -> its signature of this round's keys

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        stages = {secaggplus_stage(message) for message in messages}
        if Stage.SETUP in stages:
            self.signatures.clear()
        for message in messages:
            if secaggplus_stage(message) == Stage.SHARE_KEYS:
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
