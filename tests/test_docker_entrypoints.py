"""The container scripts do what the images run, outside Docker: the coordinator entrypoint
writes a coordinator.toml that fedtune's loader accepts, migrates a password-protected
PostgreSQL and starts the gateway and the SuperLink (127.0.0.1); two nodes get keys, the CA's
holder certifies their enrollments, they enroll and connect through the gateway, and the
dashboard answers its health check; each health check says healthy, and SIGTERM to an
entrypoint's process (what `docker stop` sends) ends all it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from fedtune.coordinator.gateway import key_id
from fedtune.platform.config import load_coordinator_config
from fedtune.privacy.ledger_store import node_public_keys

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
POSTGRES_SCRIPT = ROOT / "scripts" / "postgres-for-tests.sh"
VENV_BIN = Path(sys.executable).parent
FEDTUNE = str(VENV_BIN / "fedtune")
NODES = ("hospital", "bank")  # the nodes of docker/compose.yaml

pytestmark = pytest.mark.e2e


# --- the scripts at work, outside Docker ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def script_environment(**variables: str | Path) -> dict[str, str]:
    """This environment with the venv's `fedtune` and `python` first on PATH."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"} | {
        key: str(value) for key, value in variables.items()
    }


def run_script(script: str, *args: str, **variables: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DOCKER / script), *args],
        env=script_environment(**variables),
        capture_output=True,
        text=True,
        timeout=120,
    )


def healthcheck(kind: str, **variables: str | Path) -> subprocess.CompletedProcess:
    return run_script("healthcheck.sh", kind, **variables)


@pytest.fixture(scope="module")
def password_postgres() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL (scripts/postgres-for-tests.sh) with a database whose role must
    give its password (scram-sha-256); yields (URL without the password, the password)."""
    directory = tempfile.mkdtemp(prefix="fedtune-docker-pg-", dir="/tmp")
    started = subprocess.run(
        ["bash", str(POSTGRES_SCRIPT), "start", directory], capture_output=True, text=True
    )
    if started.returncode == 3:
        os.rmdir(directory)
        pytest.skip(f"no PostgreSQL: {started.stderr.strip()}")
    try:
        assert started.returncode == 0, started.stderr
        import psycopg
        from psycopg import sql

        admin = sa.make_url(started.stdout.strip())
        password = secrets.token_urlsafe(12) + r":\pw"  # ':' and '\' need escaping in pgpass
        with psycopg.connect(
            host=admin.host, port=admin.port, user=admin.username, dbname=admin.database
        ) as connection:
            connection.autocommit = True
            connection.execute(
                sql.SQL("CREATE ROLE fedtune LOGIN PASSWORD {}").format(sql.Literal(password))
            )
            connection.execute("CREATE DATABASE fedtune OWNER fedtune")
            hba = Path(directory) / "data" / "pg_hba.conf"
            hba.write_text("host all fedtune 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
            connection.execute("SELECT pg_reload_conf()")
        url = f"postgresql+psycopg://fedtune@127.0.0.1:{admin.port}/fedtune"
        with pytest.raises(sa.exc.OperationalError, match="password"):
            sa.create_engine(url, poolclass=sa.NullPool).connect().close()
        yield url, password
    finally:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "stop", directory], check=False)


class Processes:
    """What the tests start: each in a session of its own, all ended at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, script: str, **variables: str | Path) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                ["bash", str(DOCKER / script)],
                env=script_environment(**variables),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def members(self) -> list[psutil.Process]:
        """Every process started and their children."""
        found = []
        for process in self.started.values():
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(process.pid)
                found += [parent, *parent.children(recursive=True)]
        return found

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_healthy(
    processes: Processes, name: str, kind: str, timeout_s: float, **variables: str | Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        check = healthcheck(kind, **variables)
        if check.returncode == 0:
            return
        if processes.started[name].poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{name}: {check.stdout.strip()}\n{processes.log(name)[-3000:]}")
        time.sleep(0.5)


def node_toml(name: str, state: Path, data: Path, model: Path, certs: Path, port: int) -> str:
    return (
        f'[node]\nname = "{name}"\nstate_dir = "{state}"\n\n'
        f'[model]\nspec = "{model}"\ndevice = "cpu"\n\n'
        f'[data]\ntrain = "{data}/train.jsonl"\neval = "{data}/held_out.jsonl"\n\n'
        "[training]\ntorch_threads = 1\n\n"
        f'[coordinator]\naddress = "localhost:{port}"\n'
        f'root_certificates = "{certs}/ca.pem"\nauth_key = "{state}/auth_key"\n'
    )


def stops_on_sigterm(process: subprocess.Popen[bytes], timeout_s: float = 20) -> bool:
    """SIGTERM to the entrypoint's process alone, as `docker stop` (through tini) sends it:
    it and everything it started end."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    return not alive


@dataclass
class Deployment:
    """The coordinator, two nodes and the dashboard, each started by its image's entrypoint."""

    root: Path
    database_url: str
    password: str
    port: int
    superlink_port: int
    dashboard_port: int
    processes: Processes
    enroll_runs: list[subprocess.CompletedProcess]

    @property
    def coordinator_toml(self) -> Path:
        return self.root / "coordinator" / "coordinator.toml"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    def coordinator_health(self) -> dict[str, str | Path]:
        """What the coordinator image's health check reads from the environment."""
        return {
            "FEDTUNE_PORT": str(self.port),
            "FEDTUNE_SUPERLINK_PORT": str(self.superlink_port),
            "FEDTUNE_CERTS_DIR": self.certs,
        }

    def state(self, node: str) -> Path:
        return self.root / node / "state"


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    password_postgres: tuple[str, str],
) -> Iterator[Deployment]:
    database_url, password = password_postgres
    root = tmp_path_factory.mktemp("docker-entrypoints")
    (root / "logs").mkdir()
    password_file = root / "postgres_password.txt"
    password_file.write_text(password + "\n")
    certs, enrollments = root / "certs", root / "enrollments"
    enrollments.mkdir()
    made = subprocess.run([FEDTUNE, "certs", "init", "--out", str(certs)], capture_output=True)
    assert made.returncode == 0, made.stderr
    database: dict[str, str | Path] = {
        "FEDTUNE_DATABASE_URL": database_url,
        "FEDTUNE_DATABASE_PASSWORD_FILE": password_file,
    }
    local = Deployment(
        root,
        database_url,
        password,
        free_port(),
        free_port(),
        free_port(),
        Processes(root / "logs"),
        [],
    )
    processes = local.processes
    try:
        processes.start(
            "coordinator",
            "entrypoint-coordinator.sh",
            FEDTUNE_STATE_DIR=root / "coordinator",
            FEDTUNE_HOST="127.0.0.1",
            FEDTUNE_PORT=str(local.port),
            FEDTUNE_SUPERLINK_PORT=str(local.superlink_port),
            FEDTUNE_CERTS_DIR=certs,
            PGPASSFILE=root / "coordinator.pgpass",
            **database,
        )
        inits = [
            subprocess.Popen(
                ["bash", str(DOCKER / "compose-init.sh"), "node", name, name],
                env=script_environment(
                    FEDTUNE_STATE_DIR=local.state(name),
                    FEDTUNE_DATA_DIR=root / name / "data",
                    FEDTUNE_ENROLLMENTS_DIR=enrollments,
                ),
                stderr=subprocess.PIPE,
            )
            for name in NODES
        ]
        for init in inits:
            _, errors = init.communicate(timeout=120)
            assert init.returncode == 0, errors
        wait_healthy(processes, "coordinator", "coordinator", 90, **local.coordinator_health())
        # The coordinator has migrated the database: the dashboard can open it.
        processes.start(
            "dashboard",
            "entrypoint-dashboard.sh",
            FEDTUNE_DASHBOARD_HOST="127.0.0.1",
            FEDTUNE_DASHBOARD_PORT=str(local.dashboard_port),
            PGPASSFILE=root / "dashboard.pgpass",
            **database,
        )
        # The CA key's holder certifies each node's enrollment; the second time keeps them.
        for _ in range(2):
            certified = run_script(
                "compose-init.sh",
                "certify",
                *NODES,
                FEDTUNE_CA_DIR=certs,
                FEDTUNE_ENROLLMENTS_DIR=enrollments,
            )
            assert certified.returncode == 0, certified.stderr
        for _ in range(2):  # the second time finds both enrolled and keeps them
            local.enroll_runs.append(
                run_script(
                    "compose-init.sh",
                    "enroll",
                    *NODES,
                    FEDTUNE_STATE_DIR=root / "coordinator",
                    FEDTUNE_ENROLLMENTS_DIR=enrollments,
                    FEDTUNE_DATABASE_PASSWORD_FILE=password_file,
                    PGPASSFILE=root / "enroll.pgpass",
                )
            )
            assert local.enroll_runs[-1].returncode == 0, local.enroll_runs[-1].stderr
        for name in NODES:
            toml = root / name / "node.toml"
            toml.write_text(
                node_toml(
                    name, local.state(name), root / name / "data", tiny_model_dir, certs, local.port
                )
            )
            processes.start(
                name,
                "entrypoint-node.sh",
                FEDTUNE_NODE_CONFIG=toml,
                FEDTUNE_STATE_DIR=local.state(name),
            )
        for name in NODES:
            wait_healthy(processes, name, "node", 90, FEDTUNE_STATE_DIR=local.state(name))
        wait_healthy(
            processes,
            "dashboard",
            "dashboard",
            60,
            FEDTUNE_DASHBOARD_PORT=str(local.dashboard_port),
        )
        yield local
    finally:
        processes.stop_all()


def test_coordinator_entrypoint_migrates_the_database_then_starts(deployment: Deployment) -> None:
    log = deployment.processes.log("coordinator")

    migrated = log.index("upgraded from no revision to")

    assert migrated < log.index("coordinator: gateway on 127.0.0.1:")


def test_coordinator_entrypoint_writes_a_config_with_both_ports_that_fedtune_loads(
    deployment: Deployment,
) -> None:
    config = load_coordinator_config(deployment.coordinator_toml)

    assert config.coordinator.host == "127.0.0.1"
    assert config.coordinator.port == deployment.port  # the gateway
    assert config.coordinator.superlink_port == deployment.superlink_port
    assert config.superlink_address == f"127.0.0.1:{deployment.superlink_port}"
    assert config.database_url == deployment.database_url
    assert config.tls.ca_certificate == deployment.certs / "ca.pem"
    assert "superlink_port = " in deployment.coordinator_toml.read_text()
    assert deployment.coordinator_toml.stat().st_mode & 0o777 == 0o600
    assert deployment.coordinator_toml.parent.stat().st_mode & 0o777 == 0o700


def test_coordinator_listens_on_the_gateway_port_and_the_loopback_superlink_only(
    deployment: Deployment,
) -> None:
    root = psutil.Process(deployment.processes.started["coordinator"].pid)

    listening = {
        (connection.laddr.ip, connection.laddr.port)
        for process in [root, *root.children(recursive=True)]
        for connection in process.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    }

    assert listening == {
        ("127.0.0.1", deployment.port),
        ("127.0.0.1", deployment.superlink_port),
    }


def test_every_service_reports_healthy(deployment: Deployment) -> None:
    checks = [
        healthcheck("coordinator", **deployment.coordinator_health()),
        healthcheck("dashboard", FEDTUNE_DASHBOARD_PORT=str(deployment.dashboard_port)),
        *[healthcheck("node", FEDTUNE_STATE_DIR=deployment.state(name)) for name in NODES],
    ]

    assert [check.stdout.strip() for check in checks] == ["healthy"] * 4


def test_nodes_connect_to_the_coordinator(deployment: Deployment) -> None:
    deadline = time.monotonic() + 60
    while True:
        listed = subprocess.run(
            [str(VENV_BIN / "flwr"), "supernode", "list", "fedtune", "--format", "json"],
            env=script_environment(FLWR_HOME=deployment.root / "coordinator" / "flwr"),
            capture_output=True,
            text=True,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        states = [node["status"] for node in json.loads(listed.stdout)["nodes"]]
        if states == ["online", "online"] or time.monotonic() > deadline:
            break
        time.sleep(1)

    assert states == ["online", "online"]


def pem_of_ssh_public_key(path: Path) -> bytes:
    """A node's OpenSSH public key as the PEM bytes Flower sends."""
    key = serialization.load_ssh_public_key(path.read_bytes())
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_nodes_reach_the_coordinator_through_the_gateway(deployment: Deployment) -> None:
    access_log = deployment.root / "coordinator" / "gateway" / "access.log"
    expected = {
        name: f"key={key_id(pem_of_ssh_public_key(deployment.state(name) / 'auth_key.pub'))}"
        for name in NODES
    }

    deadline = time.monotonic() + 60
    while True:
        logged = access_log.read_text() if access_log.exists() else ""
        missing = [name for name, key in expected.items() if key not in logged]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)

    assert not missing, f"no Fleet request of {missing} in {access_log}"
    assert "/v1/fleet/" in logged


def test_enrollment_stores_the_ledger_keys_once(deployment: Deployment) -> None:
    engine = sa.create_engine(
        sa.make_url(deployment.database_url).set(password=deployment.password)
    )

    with Session(engine) as session:
        stored = {name: node_public_keys(session, name) for name in NODES}
    engine.dispose()

    enrolled = {
        name: json.loads((deployment.state(name) / "enrollment.json").read_text()) for name in NODES
    }
    assert stored == {name: [enrolled[name]["ledger_public_key"]] for name in NODES}
    assert deployment.enroll_runs[1].stderr.count("enrolled already with these keys") == 2


def test_password_is_on_no_command_line_and_in_no_config(deployment: Deployment) -> None:
    command_lines = []
    for member in deployment.processes.members():
        with contextlib.suppress(psutil.Error):
            command_lines.append(" ".join(member.cmdline()))

    assert command_lines and not [line for line in command_lines if deployment.password in line]
    assert deployment.password not in deployment.coordinator_toml.read_text()
    pgpass = deployment.root / "coordinator.pgpass"
    assert pgpass.stat().st_mode & 0o777 == 0o600


def test_admin_commands_find_the_password_the_entrypoint_wrote(deployment: Deployment) -> None:
    status = subprocess.run(
        [FEDTUNE, "run", "status", "--json", "--coordinator", str(deployment.coordinator_toml)],
        env=script_environment(PGPASSFILE=deployment.root / "coordinator.pgpass"),
        capture_output=True,
        text=True,
    )

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == []


# The SIGTERM tests stop the services: they come last.


def test_nodes_stop_on_sigterm_and_withdraw_their_service_file(deployment: Deployment) -> None:
    stopped = {name: stops_on_sigterm(deployment.processes.started[name]) for name in NODES}

    assert stopped == {name: True for name in NODES}
    assert not [n for n in NODES if (deployment.state(n) / "trainer.json").exists()]


def test_dashboard_stops_on_sigterm(deployment: Deployment) -> None:
    assert stops_on_sigterm(deployment.processes.started["dashboard"])


def test_coordinator_stops_on_sigterm(deployment: Deployment) -> None:
    assert stops_on_sigterm(deployment.processes.started["coordinator"])

    assert healthcheck("coordinator", **deployment.coordinator_health()).returncode == 1


def test_node_entrypoint_refuses_a_state_dir_that_is_not_the_configs(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(node_toml("n1", tmp_path / "state", tmp_path, tmp_path, tmp_path, 9092))

    result = run_script(
        "entrypoint-node.sh", FEDTUNE_NODE_CONFIG=toml, FEDTUNE_STATE_DIR=tmp_path / "elsewhere"
    )

    assert result.returncode == 1
    assert "node.state_dir is" in result.stderr and "FEDTUNE_STATE_DIR" in result.stderr


def test_coordinator_entrypoint_names_missing_certificates(tmp_path: Path) -> None:
    result = run_script(
        "entrypoint-coordinator.sh",
        FEDTUNE_STATE_DIR=tmp_path / "state",
        FEDTUNE_CERTS_DIR=tmp_path / "certs",
    )

    assert result.returncode == 1
    assert f"{tmp_path / 'certs'}/ca.pem is missing" in result.stderr


@pytest.mark.parametrize(
    ("gateway_port", "superlink_port", "message"),
    [
        ("9092", "9092", "superlink_port (9092) must differ from port"),
        ("9092", "93x", "FEDTUNE_SUPERLINK_PORT=93x is not a port number"),
    ],
    ids=["same-port", "not-a-number"],
)
def test_coordinator_entrypoint_refuses_bad_ports_before_migrating(
    tmp_path: Path, gateway_port: str, superlink_port: str, message: str
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "server.pem", "server.key"):
        (certs / name).write_text("")  # only their presence is checked before the config loads
    database = tmp_path / "fedtune.db"

    result = run_script(
        "entrypoint-coordinator.sh",
        FEDTUNE_STATE_DIR=tmp_path / "state",
        FEDTUNE_CERTS_DIR=certs,
        FEDTUNE_PORT=gateway_port,
        FEDTUNE_SUPERLINK_PORT=superlink_port,
        FEDTUNE_DATABASE_URL=f"sqlite:///{database}",
    )

    assert result.returncode == 1
    assert message in result.stderr
    assert not database.exists()


def test_password_file_never_overwrites_a_pgpass_it_did_not_write(tmp_path: Path) -> None:
    secret, pgpass = tmp_path / "password", tmp_path / "pgpass"
    secret.write_text("s3cret\n")
    pgpass.write_text("db:5432:*:someone:theirs\n")

    result = run_script(
        "entrypoint-dashboard.sh",
        "true",
        FEDTUNE_DATABASE_PASSWORD_FILE=secret,
        PGPASSFILE=pgpass,
    )

    assert result.returncode == 1 and "was not written by this entrypoint" in result.stderr
    assert pgpass.read_text() == "db:5432:*:someone:theirs\n"


def test_healthchecks_say_unhealthy_when_nothing_runs(tmp_path: Path) -> None:
    port = str(free_port())

    checks = [
        healthcheck("coordinator", FEDTUNE_PORT=port),
        healthcheck("dashboard", FEDTUNE_DASHBOARD_PORT=port),
        healthcheck("node", FEDTUNE_STATE_DIR=tmp_path),
    ]

    assert [check.returncode for check in checks] == [1, 1, 1]
    assert all(check.stdout.startswith("unhealthy: ") for check in checks)
