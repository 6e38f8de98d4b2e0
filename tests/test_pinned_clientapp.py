"""A node runs only fedtune's own ClientApp, whatever a coordinator sends: tried against a
malicious coordinator (stock Flower SuperLink, TLS, node authentication) that submits a run
whose bundle carries its own ClientApp. Real processes on 127.0.0.1, stopped by the test."""

from __future__ import annotations

import json
import os
import subprocess
import time

from fedtune.client_node.demo_data import write_demo_data
from fedtune.local_deployment import fedtune_command, free_port
from fedtune.platform.flower_tools import flower_command, tool_path_environment
from fedtune.platform.processes import end_process_tree
from fedtune.platform.tls import init_certificates

SERVER_APP = """\
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

CLIENT_APP = """\
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
    (app / "evil_server.py").write_text(SERVER_APP.format(result=str(result)))
    (app / "evil_client.py").write_text(CLIENT_APP.format(marker=str(marker)))
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
    assert "refused: the run's app bundle carries files" in (tmp_path / "node.log").read_text()
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
