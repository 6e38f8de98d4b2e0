"""`fedtune node start`: a deployed node. It loads the base model once into the node's trainer
service, then runs Flower's SuperNode (TLS to the coordinator, authenticated with the node's
ECDSA key) and restarts it whenever it exits: after a network failure, a coordinator restart,
or a refusal. A refused key is retried for ``coordinator.refused_retry_s`` (a node restarted
before its previous connection expired is refused too), then the node stops with a message
saying what to do.

The SuperNode runs in ``--isolation process``: it starts no Flower SuperExec, and only a holder
of the node's SuperExec secret may take its ClientApp tasks. fedtune's ClientApp worker
(:mod:`fedtune.client_node.clientapp_worker`), a thread of this process, holds it and runs
fedtune's installed ClientApp for every message, never code from a run's bundle.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from fedtune.client_node.client_app import REPLIES, node_runtime
from fedtune.client_node.clientapp_worker import ClientAppWorker
from fedtune.client_node.trainer_service import TrainerService
from fedtune.common.errors import FedtuneError
from fedtune.platform.config import ConfigError, NodeConfig, load_node_config
from fedtune.platform.runtime.flower_tools import tool_path_environment
from fedtune.platform.wire.pinned_apps import SECRET_FILE, ensure_secret

# What the SuperNode prints when the SuperLink refuses its key (with "Exit Code: 305"; the
# process itself exits with 1 in Flower 1.41).
_REFUSALS = {
    "code: 2001": "the SuperNode sent no key the coordinator accepts",
    "code: 2004": "the coordinator does not know this node's key",
}


class NodeRefusedError(FedtuneError, RuntimeError):
    """The coordinator kept refusing this node's key."""


def supernode_command(config: NodeConfig, node_toml: Path, *, port: int) -> list[str]:
    connection = config.coordinator
    if connection is None:
        raise ConfigError(f"{node_toml}: [coordinator] is required by `fedtune node start`")
    for label, path in (
        ("coordinator.root_certificates", connection.root_certificates),
        ("coordinator.auth_key", connection.auth_key),
    ):
        if not path.is_file():
            raise ConfigError(f"{node_toml}: {label}: {path} does not exist")
    return [
        # Flower's flower-supernode with a 10 s heartbeat (supernode_entry.py says why).
        sys.executable,
        "-m",
        "fedtune.platform.runtime.supernode_entry",
        "--root-certificates",
        str(connection.root_certificates),
        "--superlink",
        connection.address,
        "--auth-supernode-private-key",
        str(connection.auth_key),
        "--node-config",
        f"config='{node_toml.resolve()}'",
        # Tasks go only to fedtune's ClientApp worker, which holds this secret and runs
        # fedtune's ClientApp alone (clientapp_worker.py), never code from a run's bundle.
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(config.node.state_dir / SECRET_FILE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NodeSupervisor:
    """Runs the SuperNode and restarts it; ``stop()`` ends it (SIGTERM: the coordinator marks
    the node offline at once)."""

    def __init__(self, node_toml: Path, *, say: Callable[[str], None] = print):
        self.node_toml = node_toml
        self.config = load_node_config(node_toml)
        self.port = _free_port()  # the SuperNode's runtime API, for the ClientApp worker
        self.say = say
        self._stopping = threading.Event()
        self._process: subprocess.Popen[str] | None = None

    def run(self) -> int:
        config = self.config
        connection = config.coordinator
        command = supernode_command(config, self.node_toml, port=self.port)
        assert connection is not None
        _make_private(config.node.state_dir)
        self.say(f"node {config.node.name}: loading the base model ({config.model.spec})")
        node_runtime(config)
        service = TrainerService(config, REPLIES)
        service.start()
        try:
            return self._supervise(command, refused_retry_s=connection.refused_retry_s)
        finally:
            service.stop()

    def _supervise(self, command: list[str], *, refused_retry_s: float) -> int:
        refused_since: float | None = None
        delay = 1.0
        while not self._stopping.is_set():
            address = command[command.index("--superlink") + 1]
            self.say(f"node {self.config.node.name}: connecting to {address}")
            code, refusal = self._run_once(command)
            if self._stopping.is_set():
                break
            if refusal is not None:
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > refused_retry_s:
                    raise NodeRefusedError(
                        f"the coordinator refused node {self.config.node.name}: {refusal}. "
                        "Give the admin this node's enrollment.json (fedtune node keygen) to run "
                        "`fedtune coordinator enroll enrollment.json --name "
                        f"{self.config.node.name}`"
                    )
                self.say(
                    f"refused ({refusal}); retrying: a restarted node waits until its "
                    "previous connection expires"
                )
                delay = 10.0
            else:
                refused_since = None
                self.say(f"SuperNode exited with code {code}; restarting in {delay:.0f} s")
            self._stopping.wait(delay)
            delay = min(delay * 2, 30.0)
        return 0

    def _run_once(self, command: list[str]) -> tuple[int, str | None]:
        """Run the SuperNode until it exits; its exit code and the refusal, if it was one.

        Its output is relayed by a thread: helpers it starts may hold the pipe open after it
        exits, so its exit, not the pipe's end, ends the attempt. It runs in a process group of
        its own, which is ended with it. The ClientApp worker serves it meanwhile."""
        refusals: list[str] = []
        self._process = process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=tool_path_environment(),  # the SuperNode starts Flower commands by name
            start_new_session=True,
        )
        relay = threading.Thread(target=self._relay, args=(process, refusals), daemon=True)
        relay.start()
        secret = (self.config.node.state_dir / SECRET_FILE).read_bytes()
        worker = ClientAppWorker(f"127.0.0.1:{self.port}", secret, say=self.say)
        worker_stop = threading.Event()
        serving = threading.Thread(
            target=worker.serve, args=(worker_stop,), name="clientapp-worker", daemon=True
        )
        serving.start()
        try:
            code = process.wait()
        finally:
            worker_stop.set()  # tasks under way end on their own: the SuperNode is gone
            _end_group(process.pid)
        serving.join(timeout=5)
        relay.join(timeout=5)
        return code, refusals[0] if refusals else None

    @staticmethod
    def _relay(process: subprocess.Popen[str], refusals: list[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            refusals += [why for code, why in _REFUSALS.items() if code in line]

    def stop(self, *_: object) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()


def _make_private(state_dir: Path) -> None:
    """The node's state (keys, ledger, trainer key, SuperExec secret): its account only."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    ensure_secret(state_dir / SECRET_FILE)
    for path in state_dir.iterdir():
        if path.is_file():
            path.chmod(0o600)


def _end_group(pgid: int) -> None:
    """SIGTERM what is left of the SuperNode's process group, SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def start_node(node_toml: Path) -> int:
    """The foreground `fedtune node start`: runs until SIGTERM or Ctrl-C."""
    os.umask(0o077)  # keys, ledger, logs: the node's account only
    supervisor = NodeSupervisor(node_toml)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return supervisor.run()
