"""Which connected SuperNodes take part in a deployed run, and under which names.

A SuperNode may be registered with the SuperLink behind fedtune's back (`flwr supernode
register`), and the name a node puts in its replies is whatever its operator typed. What the
SuperLink did check is the node's authentication key, and it reports that key with each
connected node (``NodeInfo.public_key``: PEM SubjectPublicKeyInfo bytes, exactly what
`flwr supernode register` sent). `fedtune coordinator enroll` records each node's name, key and
node id in the coordinator's database (:class:`~fedtune.platform.db.storage.EnrolledNode`); a
:class:`Roster` maps keys back to those names, and :class:`EnrolledGrid` shows the ServerApp
only the connected nodes enrolled under a name the run lists, refuses to address any other
node, and tells whose a reply is by the node that sent it, never by what it says.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from fedtune.common.database import transaction
from fedtune.common.errors import FedtuneError
from fedtune.platform.db.storage import EnrolledNode
from fedtune.platform.wire.messages import NODE


class NotEnrolledError(FedtuneError, RuntimeError):
    """A message addressed to a node that is not enrolled for the run."""


def flower_public_key(key: bytes | str) -> str:
    """``key`` (an OpenSSH line or PEM) as PEM SubjectPublicKeyInfo text: the form Flower's
    SuperLink stores and reports. ``ValueError`` for anything else."""
    data = key.encode("ascii") if isinstance(key, str) else key
    data = data.strip()
    loaded = (
        serialization.load_pem_public_key(data)
        if data.startswith(b"-----BEGIN")
        else serialization.load_ssh_public_key(data)
    )
    return loaded.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def enrolled_node(session: Session, name: str) -> EnrolledNode | None:
    return session.scalars(select(EnrolledNode).where(EnrolledNode.name == name)).first()


def enrolled_name_of_key(session: Session, public_key: str) -> str | None:
    """The name ``public_key`` (PEM, see :func:`flower_public_key`) is enrolled under."""
    return session.scalars(
        select(EnrolledNode.name).where(EnrolledNode.auth_public_key == public_key)
    ).first()


def record_enrollment(
    session: Session, name: str, *, public_key: str, node_id: str, certificate: str | None
) -> None:
    """Enroll ``name`` with ``public_key`` (PEM) as SuperNode ``node_id``, certified by
    ``certificate``; a rotation replaces the name's key, node id and certificate."""
    row = enrolled_node(session, name)
    if row is None:
        session.add(
            EnrolledNode(
                name=name,
                auth_public_key=public_key,
                flower_node_id=node_id,
                certificate=certificate,
            )
        )
    elif (row.auth_public_key, row.flower_node_id, row.certificate) != (
        public_key,
        node_id,
        certificate,
    ):
        row.auth_public_key, row.flower_node_id = public_key, node_id
        row.certificate = certificate
        session.add(row)


@dataclass(frozen=True)
class Roster:
    """Enrolled names by SuperNode key (PEM SubjectPublicKeyInfo text), and their
    enrollment certificates by name (none for a node enrolled before certificates)."""

    names_by_key: Mapping[str, str]
    certificates: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, engine: Engine, names: Iterable[str]) -> Roster:
        """The enrolled nodes among ``names`` (a run's ``[[nodes]]``)."""
        wanted = set(names)
        with transaction(engine) as session:
            rows = list(session.scalars(select(EnrolledNode).where(EnrolledNode.name.in_(wanted))))
            return cls(
                {row.auth_public_key: row.name for row in rows},
                {row.name: row.certificate for row in rows if row.certificate},
            )

    @property
    def names(self) -> set[str]:
        return set(self.names_by_key.values())

    def name_of(self, node: NodeInfo) -> str | None:
        """The enrolled name of the connected ``node``, by its key; None: not enrolled."""
        if not node.public_key:
            return None
        try:
            key = flower_public_key(bytes(node.public_key))
        except (ValueError, UnsupportedAlgorithm):
            return None
        return self.names_by_key.get(key)


class EnrolledGrid(Grid):
    """A Grid that holds only the run's enrolled nodes: it lists no other node and refuses
    (:class:`NotEnrolledError`) a message addressed to one; replies from other nodes are
    dropped. :meth:`enrolled_name` tells whose a node id is."""

    def __init__(
        self,
        grid: Grid,
        roster: Roster,
        *,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.grid = grid
        self.roster = roster
        self.progress = progress
        self._names: dict[int, str] = {}  # node id -> enrolled name, of every node seen
        self._ignored: set[int] = set()  # connected now, not enrolled
        self._excluded: set[int] = set()  # enrolled, but left out of this run
        self._lock = threading.Lock()

    # -- the nodes ---------------------------------------------------------------------
    def get_nodes(self) -> list[NodeInfo]:
        named = [(node, self.roster.name_of(node)) for node in self.grid.get_nodes()]
        ignored = {int(node.node_id) for node, name in named if name is None}
        with self._lock:
            self._names.update({int(n.node_id): name for n, name in named if name is not None})
            new = ignored - self._ignored
            self._ignored = ignored
            excluded = set(self._excluded)
        if new and self.progress is not None:
            self.progress(
                f"ignored: SuperNode(s) {sorted(new)} connected, not enrolled under a name "
                "this run lists"
            )
        return [node for node, name in named if name is not None and node.node_id not in excluded]

    def get_node_ids(self) -> list[int]:
        return [int(node.node_id) for node in self.get_nodes()]

    def enrolled_name(self, node_id: int | str) -> str | None:
        with self._lock:
            return self._names.get(int(node_id))

    def exclude(self, node_id: int | str) -> None:
        """Leave an enrolled node out of the rest of the run (e.g. it claims another name)."""
        with self._lock:
            self._excluded.add(int(node_id))

    @property
    def ignored(self) -> set[int]:
        """Connected nodes left out at the last look (not enrolled, or not in the run)."""
        with self._lock:
            return set(self._ignored)

    # -- messages ----------------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._checked(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._from_enrolled(self.grid.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = self.grid.send_and_receive(self._checked(messages), timeout=timeout)
        return self._from_enrolled(replies)

    def _checked(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            node_id = message.metadata.dst_node_id
            if self.enrolled_name(node_id) is None:
                self.get_nodes()  # it may have connected since the last look
            with self._lock:
                excluded = node_id in self._excluded
            if excluded or self.enrolled_name(node_id) is None:
                raise NotEnrolledError(
                    f"refused to send a {message.metadata.message_type} message to SuperNode "
                    f"{node_id}: it is not enrolled for this run"
                )
        return messages

    def _from_enrolled(self, replies: Iterable[Message]) -> list[Message]:
        return [r for r in replies if self.enrolled_name(r.metadata.src_node_id) is not None]

    # -- the rest is the wrapped grid's ----------------------------------------------------
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


def reported_name(content: RecordDict) -> str | None:
    """The name a reply says it comes from (never trusted in deployment)."""
    node = content.config_records.get(NODE)
    name = node.get("name") if node is not None else None
    return name if isinstance(name, str) else None


def name_problem(enrolled: str | None, reported: str | None, node_id: int | str) -> str | None:
    """Why a reply from SuperNode ``node_id``, enrolled as ``enrolled``, cannot be taken."""
    if enrolled is None:
        return f"SuperNode {node_id} is not enrolled for this run"
    if reported is not None and reported != enrolled:
        return (
            f"the reply says it comes from {reported!r}, but SuperNode {node_id} is enrolled "
            f"as {enrolled!r}"
        )
    return None
