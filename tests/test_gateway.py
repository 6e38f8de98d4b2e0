"""The coordinator's front door, tried as an outsider would: `fedtune coordinator start` on
127.0.0.1 (gateway, SuperLink, SuperExec), probed with Flower's own CLI and raw HTTPS through
the public address; every process is stopped by the fixture.

Nodes reaching and training through the gateway are tests/test_deployment.py's.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import AcquireTaskRequest

from fedtune.coordinator.gateway import BURST_SECONDS, FLEET_PATHS, gateway_folder, key_id
from fedtune.coordinator.superlink import CONNECTION, CoordinatorError, flwr
from fedtune.demo.data import write_demo_data
from fedtune.demo.local_deployment import LocalDeployment
from fedtune.platform.runtime.flower_tools import flower_command, tool_path_environment

pytestmark = pytest.mark.e2e

CONTROL_PATHS = [
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/control/stop-run",
    "/v1/control/stream-logs",
    "/v1/control/register-node",
    "/v1/control/unregister-node",
    "/v1/control/list-nodes",
]
OTHER_PATHS = [
    "/v1/runtime/acquire-task",
    "/v1/runtime/pull-task-input",
    "/docs",
    "/openapi.json",
    "/redoc",
    "/",
]
P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
    "581a0db248b0a77aecec196accc52973",
    16,
)
PATH_TRICKS = [
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/get-run/../../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E/control/list-runs",
    "/v1/fleet/get-run%2f..%2f..%2fcontrol%2flist-runs",
    "//v1/control/list-runs",
    "/v1//control/list-runs",
    "/v1/control/list-runs/",
    "/V1/CONTROL/LIST-RUNS",
    "/v1/control/list-runs?x=1",
    "/v1/fleet/get-run?/../../control/list-runs",
    "/v1/fleet/get-run%3f/../control/list-runs",
    "/v1/fleet/get-run%00",
    "/v1/fleet/get-run;/../../control/list-runs",
    "/v1/fleet/get-run/",
    "/v1/fleet/get-run#/../../control/list-runs",
    "/%2e%2e/v1/control/list-runs",
    "/healthz/../v1/control/list-runs",
    "/v1/runtime/../control/list-runs",
]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    workdir = tmp_path_factory.mktemp("gateway")
    write_demo_data(workdir / "data", domain="hospital", train=8, held_out=2)
    with LocalDeployment(workdir, encrypt_checkpoints=False) as local:
        local.init_coordinator()
        local.start_coordinator()
        data = workdir / "data"
        local.add_node(
            "hospital",
            sections={
                "data": {"train": str(data / "train.jsonl"), "eval": str(data / "held_out.jsonl")}
            },
        )
        local.enroll("hospital")
        yield local


def request(
    address: str,
    method: str,
    path: str,
    *,
    ca: Path | None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> int:
    """One HTTPS request sent as written (no normalisation); its status code."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    context.check_hostname = False
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for name, value in {
            "content-type": "application/protobuf",
            "content-length": str(len(body)),
            **(headers or {}),
        }.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        return connection.getresponse().status
    finally:
        connection.close()


def outsider_flwr(
    local: LocalDeployment, home: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Flower's CLI with a fresh FLWR_HOME whose one connection is the public address."""
    home.mkdir(parents=True, exist_ok=True)
    config = local.coordinator
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "outsider"\n\n[superlink.outsider]\n'
        f'address = "{config.public_address}"\n'
        f'root-certificates = "{config.tls.ca_certificate}"\n'
    )
    return subprocess.run(
        [flower_command("flwr"), *args],
        env={**tool_path_environment(), "FLWR_HOME": str(home), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def superlink_requests(local: LocalDeployment) -> list[str]:
    """The request lines the SuperLink itself logged (uvicorn's access log)."""
    return [
        line for line in local.log("coordinator").read_text().splitlines() if '"POST /v1/' in line
    ]


def signed_headers(
    private_key: ec.EllipticCurvePrivateKey, *, at: datetime | None = None
) -> dict[str, str]:
    """The headers Flower's SuperNode sends (supernode/node_auth_http_interceptor.py)."""
    timestamp = (at or datetime.now(UTC)).isoformat()
    signature = private_key.sign(timestamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "flwr-public-key": base64.b64encode(pem).decode("ascii"),
        "flwr-timestamp": timestamp,
        "flwr-signature": base64.b64encode(signature).decode("ascii"),
    }


def node_private_key(local: LocalDeployment, name: str) -> ec.EllipticCurvePrivateKey:
    path = local.workdir / "nodes" / name / "state" / "auth_key"
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_nothing_but_the_fleet_api_and_a_health_check_gets_through(coordinator):
    address = coordinator.coordinator.public_address
    ca = coordinator.coordinator.tls.ca_certificate
    before = len(superlink_requests(coordinator))

    answers = {
        (verify, method, path): request(address, method, path, ca=ca if verify else None)
        for verify in (True, False)
        for method in ("GET", "POST", "PUT", "DELETE")
        for path in CONTROL_PATHS + OTHER_PATHS + PATH_TRICKS
    }

    assert request(address, "GET", "/healthz", ca=ca) == 200
    allowed = {key: status for key, status in answers.items() if status < 400}
    assert allowed == {}
    logged = superlink_requests(coordinator)[before:]
    assert not [line for line in logged if "/v1/control" in line or "/docs" in line], logged


def test_fleet_requests_without_node_authentication_are_refused_at_the_gateway(coordinator):
    address = coordinator.coordinator.public_address
    ca = coordinator.coordinator.tls.ca_certificate

    statuses = {path: request(address, "POST", path, ca=ca) for path in FLEET_PATHS}

    assert set(statuses.values()) == {401}


def test_an_outsider_with_flowers_cli_can_do_nothing(coordinator, tmp_path):
    home = tmp_path / "outsider-flwr"
    public_key = coordinator.workdir / "nodes" / "hospital" / "state" / "auth_key.pub"
    marker = tmp_path / "serverapp-ran"
    app = tmp_path / "evil-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndescription = ""\nlicense = "Apache-2.0"\n'
        'dependencies = []\n\n[tool.flwr.app]\npublisher = "evil"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil:app"\nclientapp = "evil:client"\n'
    )
    (app / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.serverapp import ServerApp\nfrom flwr.clientapp import ClientApp\n"
        "app = ServerApp()\nclient = ClientApp()\n"
    )

    attempts = {
        "list runs": outsider_flwr(coordinator, home, "ls", "outsider"),
        "register": outsider_flwr(
            coordinator, home, "supernode", "register", str(public_key), "outsider", "--name", "x"
        ),
        "list nodes": outsider_flwr(coordinator, home, "supernode", "list", "outsider"),
        "unregister": outsider_flwr(coordinator, home, "supernode", "unregister", "1", "outsider"),
        "stop": outsider_flwr(coordinator, home, "stop", "1", "outsider"),
        "run": outsider_flwr(coordinator, home, "run", str(app), "outsider"),
    }

    assert {what: done.returncode for what, done in attempts.items() if done.returncode == 0} == {}
    time.sleep(2)  # a ServerApp the SuperExec had started would have written by now
    assert not marker.exists()
    listing = flwr(coordinator.coordinator, "supernode", "list", CONNECTION, "--format", "json")
    assert len(json.loads(listing)["nodes"]) == 1  # the enrolled hospital only


def test_the_admin_on_the_coordinator_host_uses_the_control_api(coordinator):
    listing = flwr(coordinator.coordinator, "supernode", "list", CONNECTION, "--format", "json")

    assert len(json.loads(listing)["nodes"]) == 1


def test_the_runtime_api_hands_no_task_to_a_poller_without_the_superexec_secret(coordinator):
    config = coordinator.coordinator
    body = AcquireTaskRequest().SerializeToString()

    status = request(
        config.superlink_address, "POST", "/v1/runtime/acquire-task", ca=None, body=body
    )

    assert status in (401, 403)


def test_a_replayed_node_login_is_refused_and_logged(coordinator):
    config = coordinator.coordinator
    key = node_private_key(coordinator, "hospital")
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    node_id = int(coordinator.enroll("hospital"))  # idempotent: the enrolled id
    body = SendNodeHeartbeatRequest(
        node=Node(node_id=node_id), heartbeat_interval=30
    ).SerializeToString()
    headers = signed_headers(key)
    path = "/v1/fleet/send-node-heartbeat"
    first = request(
        config.public_address,
        "POST",
        path,
        ca=config.tls.ca_certificate,
        body=body,
        headers=headers,
    )
    # The same headers from another process; then the same timestamp with the ECDSA
    # signature's malleable twin (r, n - s), which Flower's check also accepts.
    replay = subprocess.run(
        [
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "content-type: application/protobuf",
            *[arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")],
            "--data-binary",
            "@-",
            f"https://{config.public_address}{path}",
        ],
        input=body,
        capture_output=True,
        timeout=30,
    )
    r, s = decode_dss_signature(base64.b64decode(headers["flwr-signature"]))
    twin = encode_dss_signature(r, P384_ORDER - s)
    malleated = {**headers, "flwr-signature": base64.b64encode(twin).decode("ascii")}
    second = request(
        config.public_address,
        "POST",
        path,
        ca=config.tls.ca_certificate,
        body=body,
        headers=malleated,
    )

    assert first == 200
    assert replay.stdout.decode() == "403"
    assert second == 403
    errors = (gateway_folder(config) / "error.log").read_text()
    assert f"key {key_id(pem)}: replayed node authentication" in errors
    access = (gateway_folder(config) / "access.log").read_text()
    assert f'"POST {path}" 200' in access and f"key={key_id(pem)}" in access


# Two nodes, one enrolled: the run fails after node_wait_s whether or not an earlier test's
# heartbeat left "hospital" looking online (a message to it would wait for its expiry).
RUN_TOML = """\
[run]
rounds = 1
min_nodes = 2

[model]
spec = "{model}"

[aggregation]
node_wait_s = 5

[[nodes]]
name = "hospital"

[[nodes]]
name = "bank"

[output]
dir = "runs/token"
"""


def test_a_serverapp_gets_its_task_token_on_stdin_never_on_its_command_line(
    coordinator, tiny_model_dir
):
    run_toml = coordinator.workdir / "token-run.toml"
    run_toml.write_text(RUN_TOML.format(model=tiny_model_dir))

    run_id = coordinator.submit(run_toml)
    serverapps, with_token = [], []
    deadline = time.monotonic() + 120
    while not serverapps and time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            line = process.info["cmdline"] or []
            if "fedtune.coordinator.serverapp_process" in line:
                serverapps.append(line)
            if "--token" in line:
                with_token.append(line)
        time.sleep(0.2)
    status = coordinator.wait_for_run(run_id, timeout_s=180)

    assert serverapps and all("--token-stdin" in line for line in serverapps)
    assert with_token == []
    assert status == "failed"  # fedtune's ServerApp ran: not two nodes within 5 s


def test_the_coordinator_refuses_a_gateway_it_cannot_build(tmp_path):
    with LocalDeployment(tmp_path) as local:
        local.init_coordinator()
        toml = local.coordinator_toml
        toml.write_text(toml.read_text() + '\n[gateway]\nmodules_dir = "/nonexistent"\n')

        with pytest.raises(CoordinatorError, match=r"gateway\.modules_dir: /nonexistent/ndk"):
            from fedtune.coordinator.superlink import prepare

            prepare(local.coordinator)


def test_the_state_folder_and_databases_are_private(coordinator):
    state = coordinator.coordinator.coordinator.state_dir

    modes = {
        path.name: oct(os.stat(path).st_mode & 0o777)
        for path in [
            state,
            state / "fedtune.db",
            state / "superlink.db",
            state / "superexec.secret",
        ]
    }

    assert modes == {
        state.name: "0o700",
        "fedtune.db": "0o600",
        "superlink.db": "0o600",
        "superexec.secret": "0o600",
    }


def test_the_coordinator_listens_on_the_gateway_port_and_the_loopback_superlink_only(coordinator):
    config = coordinator.coordinator
    root = psutil.Process(coordinator.processes["coordinator"].pid)

    listening = {
        (connection.laddr.ip, connection.laddr.port)
        for process in [root, *root.children(recursive=True)]
        for connection in process.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    }

    assert listening == {
        ("127.0.0.1", config.coordinator.port),  # the gateway (coordinator.host in production)
        ("127.0.0.1", config.coordinator.superlink_port),
    }


def test_a_login_dated_outside_flowers_window_is_refused_before_it_is_recorded(coordinator):
    config = coordinator.coordinator
    key = node_private_key(coordinator, "hospital")
    path = "/v1/fleet/send-node-heartbeat"

    statuses = [
        request(
            config.public_address,
            "POST",
            path,
            ca=config.tls.ca_certificate,
            headers=signed_headers(key, at=datetime.now(UTC) + shift),
        )
        for shift in (timedelta(minutes=10), timedelta(minutes=-10))
    ]

    assert statuses == [401, 401]
    assert "outside Flower's window" in (gateway_folder(config) / "error.log").read_text()


def test_a_login_the_superlink_refused_is_not_kept_in_the_replay_cache(coordinator):
    config = coordinator.coordinator
    stranger = ec.generate_private_key(ec.SECP384R1())  # not enrolled: the SuperLink says 401
    headers = signed_headers(stranger)
    path = "/v1/fleet/send-node-heartbeat"
    body = SendNodeHeartbeatRequest(node=Node(node_id=1), heartbeat_interval=30)

    statuses = [
        request(
            config.public_address,
            "POST",
            path,
            ca=config.tls.ca_certificate,
            body=body.SerializeToString(),
            headers=headers,
        )
        for _ in range(2)
    ]

    assert statuses == [401, 401]  # not 403: junk logins do not fill the cache


def flood(
    address: str, path: str, *, ca: Path, source: str, refusals: int, deadline_s: float = 120
) -> tuple[list[int], float]:
    """POSTs without a login from ``source`` over kept-alive connections, as fast as one
    client sends them, until ``refusals`` were answered 503 (or ``deadline_s``): their
    statuses in order, and the seconds it took."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    statuses: list[int] = []
    started = time.monotonic()
    connection = None
    while statuses.count(503) < refusals and time.monotonic() - started < deadline_s:
        if connection is None:
            connection = http.client.HTTPSConnection(
                host, int(port), context=context, timeout=30, source_address=(source, 0)
            )
        connection.request("POST", path, body=b"", headers={"content-length": "0"})
        answer = connection.getresponse()
        answer.read()
        statuses.append(answer.status)
        if answer.will_close:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()
    return statuses, time.monotonic() - started


def test_a_flood_from_one_address_is_cut_by_nginx_and_other_addresses_get_through(coordinator):
    config = coordinator.coordinator
    rate = config.gateway.requests_per_second
    burst = rate * BURST_SECONDS
    path = "/v1/fleet/pull-messages"
    error_log = gateway_folder(config) / "error.log"
    refused_before = error_log.read_text().count("from 127.0.0.2 key")

    # 127.0.0.2 is this host's loopback too: the flooder, apart from the nodes' 127.0.0.1.
    statuses, took = flood(
        config.public_address,
        path,
        ca=config.tls.ca_certificate,
        source="127.0.0.2",
        refusals=100,
    )
    other = request(config.public_address, "POST", path, ca=config.tls.ca_certificate)

    answered = [status for status in statuses if status != 503]
    assert set(statuses) == {401, 503}, set(statuses)
    assert statuses[:burst] == [401] * burst  # a burst of ten seconds' worth passes
    assert len(answered) <= burst + rate * took + rate  # then the rate, give or take a second
    assert other == 401  # another address still reaches the node check
    log = error_log.read_text()
    assert "limiting requests" in log
    # The node check saw only what nginx let through.
    assert log.count("from 127.0.0.2 key") - refused_before == len(answered)


def test_a_run_with_a_serverapp_of_its_own_is_refused_on_the_coordinator(coordinator, tmp_path):
    marker = tmp_path / "serverapp-ran"
    app = tmp_path / "own-serverapp"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "own"\nversion = "1.0.0"\ndescription = ""\nlicense = "Apache-2.0"\n'
        'dependencies = []\n\n[tool.flwr.app]\npublisher = "local"\n\n'
        '[tool.flwr.app.components]\nserverapp = "own:app"\nclientapp = "own:client"\n'
    )
    (app / "own.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.serverapp import ServerApp\nfrom flwr.clientapp import ClientApp\n"
        "app = ServerApp()\nclient = ClientApp()\n"
    )
    config = coordinator.coordinator

    # A local account on the coordinator host reaches the Control API (threat model).
    submitted = json.loads(flwr(config, "run", str(app), CONNECTION, "--format", "json"))
    run_id = str(submitted["run-id"])
    deadline = time.monotonic() + 120
    status = ""
    while time.monotonic() < deadline and "finished" not in status:
        runs = json.loads(flwr(config, "ls", CONNECTION, "--format", "json"))["runs"]
        status = next(str(run["status"]) for run in runs if str(run["run-id"]) == run_id)
        time.sleep(1)

    assert status == "finished:failed"
    assert not marker.exists()
    logs = flwr(config, "log", run_id, CONNECTION, "--show")
    assert "UntrustedBundleError: refused: fedtune runs only its own ServerApp" in logs
