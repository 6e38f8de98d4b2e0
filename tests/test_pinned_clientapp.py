"""A node runs only fedtune's own ClientApp, whatever a coordinator sends.

Fast: the bundle check (what `fedtune run start` submits passes, anything else is refused with
a reason), the worker's refusal reply, and the modes of the node's state. End to end: a
malicious coordinator (stock Flower SuperLink, TLS, node authentication) submits a run whose
bundle carries its own ClientApp; real processes on 127.0.0.1, stopped by the test."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from fedtune.client_node.clientapp_worker import ClientAppWorker
from fedtune.client_node.trainer_service import SERVICE_FILE, TrainerService
from fedtune.demo.data import write_demo_data
from fedtune.demo.local_deployment import fedtune_command, free_port
from fedtune.platform.config import DataConfig, NodeConfig, NodeSettings
from fedtune.platform.runtime.flower_tools import flower_command, tool_path_environment
from fedtune.platform.runtime.processes import end_process_tree
from fedtune.platform.security.tls import init_certificates
from fedtune.privacy.node_ledger import LEDGER_FILE, NodeLedger

pytestmark = pytest.mark.e2e


def _renamed_clientapp(folder: Path, reference: str) -> Path:
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace("fedtune.client_node.deployed_app:app", reference)
    )
    return folder


def test_the_worker_answers_a_foreign_bundle_with_an_error_reply_and_never_calls_the_app(
    app_folder,
):
    content = build_fab_from_disk(_renamed_clientapp(app_folder, "evil_app:app"))
    fab = Fab(hash_str=hashlib.sha256(content).hexdigest(), content=content, verifications={})
    run = Run.create_empty(run_id=123)
    called, said = [], []
    worker = ClientAppWorker(
        "127.0.0.1:1", b"secret", say=said.append, app=lambda *args: called.append(args)
    )
    metadata = Metadata(
        run_id=123,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type="query.describe",
    )
    message = Message(content=RecordDict(), metadata=metadata)
    context = Context(run_id=123, node_id=1, node_config={}, state=RecordDict(), run_config={})

    reply, details = worker._reply(message, context, run, fab)

    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert reply.error.reason == details == said[0]
    assert details.endswith("run 123 names ClientApp 'evil_app:app'")
    assert not called


def test_the_flower_processes_a_node_starts_inherit_telemetry_and_update_checks_off():
    environment = tool_path_environment()  # what NodeSupervisor starts the SuperNode with

    assert environment["FLWR_TELEMETRY_ENABLED"] == "0"
    assert environment["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def test_the_node_s_ledger_and_trainer_file_are_the_node_account_s_only(tmp_path):
    state = tmp_path / "state"
    config = NodeConfig(
        node=NodeSettings(name="hospital", state_dir=state),
        data=DataConfig(train=tmp_path / "train.jsonl", eval=tmp_path / "eval.jsonl"),
    )
    NodeLedger(state, node="hospital")
    (state / SERVICE_FILE).write_text("{}")
    (state / SERVICE_FILE).chmod(0o644)  # left by an older version
    service = TrainerService(config, {})

    service.start()
    try:
        modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
    finally:
        service.stop()

    assert state.stat().st_mode & 0o777 == 0o700
    assert modes[LEDGER_FILE] == modes[SERVICE_FILE] == 0o600


EVIL_SERVER_APP = """\
import json
import time
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.time() + 90
    nodes = []
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.describe") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=120))
    Path({result!r}).write_text(
        json.dumps([r.error.reason if r.has_error() else "answered" for r in replies])
    )
"""

EVIL_CLIENT_APP = """\
from pathlib import Path

Path({marker!r}).write_text("the bundle's ClientApp ran on the node")

from flwr.clientapp import ClientApp

app = ClientApp()
"""

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "not-fedtune"
version = "1.0.0"
description = ""
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "evil_server:app"
clientapp = "evil_client:app"
"""

NODE_TOML = """\
[node]
name = "hospital"
state_dir = "state"

[model]
spec = "{model}"

[data]
train = "{data}/hospital/train.jsonl"
eval = "{data}/hospital/held_out.jsonl"

[coordinator]
address = "127.0.0.1:{port}"
root_certificates = "{ca}"
auth_key = "state/auth_key"
"""


def test_a_run_bundle_with_its_own_clientapp_is_refused_and_nothing_of_it_runs(
    tmp_path, tiny_model_dir
):
    certs = init_certificates(tmp_path / "certs")
    port = free_port()
    mallory = {**tool_path_environment(), "FLWR_HOME": str(tmp_path / "mallory-flwr")}
    (tmp_path / "mallory-flwr").mkdir()
    (tmp_path / "mallory-flwr" / "config.toml").write_text(
        '[superlink]\ndefault = "evil"\n\n[superlink.evil]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs.ca_cert}"\n'
    )
    node_home = tmp_path / "node-flwr"
    marker, result = tmp_path / "clientapp-ran", tmp_path / "replies.json"
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "evil_server.py").write_text(EVIL_SERVER_APP.format(result=str(result)))
    (app / "evil_client.py").write_text(EVIL_CLIENT_APP.format(marker=str(marker)))
    write_demo_data(tmp_path / "data", domain="hospital", train=8, held_out=2)
    node_dir = tmp_path / "node"
    subprocess.run(fedtune_command("node", "keygen", "--out", str(node_dir / "state")), check=True)
    (node_dir / "node.toml").write_text(
        NODE_TOML.format(model=tiny_model_dir, data=tmp_path / "data", port=port, ca=certs.ca_cert)
    )
    processes = []
    try:
        processes.append(
            subprocess.Popen(
                [
                    flower_command("flower-superlink"),
                    *("--ssl-ca-certfile", str(certs.ca_cert)),
                    *("--ssl-certfile", str(certs.server_cert)),
                    *("--ssl-keyfile", str(certs.server_key)),
                    "--enable-supernode-auth",
                    "--disable-runtime-dependency-installation",
                    *("--host", "127.0.0.1", "--port", str(port)),
                ],
                env=mallory,
                stdout=(tmp_path / "superlink.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        flwr = [flower_command("flwr")]
        _retry(
            [*flwr, "supernode", "register", str(node_dir / "state" / "auth_key.pub"), "evil"],
            env=mallory,
        )
        processes.append(
            subprocess.Popen(
                fedtune_command("node", "start", "--config", str(node_dir / "node.toml")),
                env={**os.environ, "FLWR_HOME": str(node_home)},
                stdout=(tmp_path / "node.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        subprocess.run([*flwr, "run", str(app), "evil"], env=mallory, check=True, timeout=120)
        deadline = time.monotonic() + 240
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        for process in reversed(processes):
            end_process_tree(process.pid)

    replies = json.loads(result.read_text())
    assert len(replies) == 1 and "refused" in replies[0] and "evil_client.py" in replies[0]
    assert not marker.exists()
    assert not list(node_home.glob("apps/*"))  # nothing of the bundle was installed
    node_log = (tmp_path / "node.log").read_text()
    assert "refused: fedtune runs only its own ServerApp and ClientApp" in node_log
    assert "names ClientApp 'evil_client:app'" in replies[0]
    state = node_dir / "state"  # keys, ledger, SuperExec secret: the node's account only
    assert state.stat().st_mode & 0o777 == 0o700
    modes = {path.name: path.stat().st_mode & 0o777 for path in state.iterdir()}
    assert set(modes.values()) == {0o600} and "superexec.secret" in modes


def _retry(command: list[str], *, env: dict[str, str], attempts: int = 30) -> None:
    """Run ``command`` until it succeeds (the SuperLink is starting)."""
    for _ in range(attempts):
        if subprocess.run(command, env=env, capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{command} kept failing")
