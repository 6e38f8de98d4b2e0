"""The node's long-lived trainer: keeps the base model warm between Flower messages.

A deployed SuperNode starts a fresh ClientApp process for every message, and loading the base
model in each would dominate a round (about 4.5 s for SmolLM2-135M, minutes for a 7B model).
So `fedtune node start` loads the model once, in this service, and the ClientApp process only
forwards each message's content to it over a loopback connection authenticated with a random
key (HMAC challenge of :mod:`multiprocessing.connection`). The address and key live in
``STATE_DIR/trainer.json`` (mode 0600), readable only by the node's own user.

One message is served at a time: the model, the data and the ledger are one node's.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtune.client_node.failure_reason import coordinator_reason
from fedtune.common.errors import FedtuneError
from fedtune.platform.config import NodeConfig

SERVICE_FILE = "trainer.json"

Handler = Callable[[NodeConfig, RecordDict], RecordDict]


class TrainerUnavailableError(FedtuneError, RuntimeError):
    """The ClientApp cannot reach its node's trainer service."""


class TrainerError(FedtuneError, RuntimeError):
    """The trainer refused or failed a message; the text is the trainer's reason."""


def _to_bytes(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def _from_bytes(payload: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(payload)
    return recorddict_from_proto(proto)


class TrainerService:
    """Serves ``handlers`` (message type -> handler) for the node ``config`` describes."""

    def __init__(self, config: NodeConfig, handlers: dict[str, Handler]):
        self.config = config
        self.handlers = handlers
        self._lock = threading.Lock()
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def service_file(self) -> Path:
        return self.config.node.state_dir / SERVICE_FILE

    def start(self) -> None:
        """Publish the address and key, then serve in a background thread."""
        host, port = self._listener.address
        state_dir = self.config.node.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(self.service_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # also when an older file had another mode
        with os.fdopen(descriptor, "w") as handle:
            json.dump(
                {"host": host, "port": port, "key": self._authkey.hex(), "pid": os.getpid()},
                handle,
            )
        self._thread = threading.Thread(target=self._serve, name="fedtune-trainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        self.service_file.unlink(missing_ok=True)

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                connection = self._listener.accept()
            except (OSError, EOFError, AuthenticationError):
                continue  # closed by stop(), or a caller that failed the key check
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: Connection) -> None:
        with connection:
            try:
                kind = connection.recv_bytes(256).decode()
                content = _from_bytes(connection.recv_bytes())
            except (EOFError, OSError, ValueError):
                return
            handler = self.handlers.get(kind)
            try:
                if handler is None:
                    raise TrainerError(f"this node does not handle '{kind}' messages")
                with self._lock:
                    reply = handler(self.config, content)
            except Exception as exc:  # the reason goes back to the coordinator
                connection.send_bytes(b"error")
                connection.send_bytes(coordinator_reason(exc).encode())
                if not isinstance(exc, FedtuneError):
                    print(f"trainer: a '{kind}' message failed:", file=sys.stderr, flush=True)
                    traceback.print_exception(exc, file=sys.stderr)
                return
            connection.send_bytes(b"ok")
            connection.send_bytes(_to_bytes(reply))


def call_trainer(state_dir: Path, kind: str, content: RecordDict) -> RecordDict:
    """Have the node's trainer service handle one message's ``content``."""
    try:
        described = json.loads((state_dir / SERVICE_FILE).read_text())
        address = (str(described["host"]), int(described["port"]))
        authkey = bytes.fromhex(described["key"])
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerUnavailableError(
            f"the node's trainer is not running ({state_dir / SERVICE_FILE}: {exc}); "
            "start the node with `fedtune node start`"
        ) from None
    try:
        connection = Client(address, authkey=authkey)
    except (OSError, AuthenticationError) as exc:
        raise TrainerUnavailableError(
            f"the node's trainer at {address[0]}:{address[1]} does not answer ({exc}); "
            "is `fedtune node start` still running?"
        ) from None
    with connection:
        connection.send_bytes(kind.encode())
        connection.send_bytes(_to_bytes(content))
        status = connection.recv_bytes()
        payload = connection.recv_bytes()
    if status != b"ok":
        raise TrainerError(payload.decode(errors="replace"))
    return _from_bytes(payload)
