"""docker/: the Dockerfile lints clean (hadolint), compose.yaml is a valid Compose file whose
services, volumes, secrets and health checks fit together, no image takes in a key or a
secret, the coordinator image carries the gateway (Debian's nginx and its Lua module) and
compose publishes the gateway's port only, and the container scripts do what the images run,
outside Docker: the coordinator entrypoint writes a coordinator.toml that fedtune's loader
accepts, migrates a password-protected PostgreSQL and starts the gateway and the SuperLink
(127.0.0.1), two nodes get keys, enroll and connect through the gateway, and the dashboard
answers its health check; each health check says healthy, and SIGTERM to an entrypoint's
process (what `docker stop` sends) ends all it started.

There is no Docker engine here: images are never built in these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
import yaml
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from fedtune.coordinator.gateway import key_id
from fedtune.platform.config import load_coordinator_config, load_node_config, load_run_config
from fedtune.privacy.ledger_store import node_public_keys

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]
SCRIPTS = sorted(DOCKER.glob("*.sh"))
POSTGRES_SCRIPT = ROOT / "scripts" / "postgres-for-tests.sh"
VENV_BIN = Path(sys.executable).parent
FEDTUNE = str(VENV_BIN / "fedtune")
SCHEMA = "vendor.compose-spec"  # the Compose specification's schema, shipped by check-jsonschema
IMAGES = ("coordinator", "node", "node-cuda", "dashboard")  # the Dockerfile's final targets
GATEWAY_PORT, SUPERLINK_PORT = "9092", "9093"  # the coordinator image's defaults
NODES = ("hospital", "bank")  # the nodes of docker/compose.yaml

# What must never be copied into an image or set in it: keys, certificates, secrets.
SECRET_PATH = re.compile(
    r"(\.(pem|key|crt|p12|pfx|db|env)$)|((^|/)(auth_key|node_key|ca\.key|secrets?|certs?|"
    r"\.env|.*password.*|.*token.*)(/|$|\.))",
    re.IGNORECASE,
)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|(^|_)KEY$", re.IGNORECASE)


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed: it is a dev dependency (pip install -e '.[dev]')")
    return found


# --- the Dockerfile ------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\").strip() if pending else line.removesuffix("\\")
        if not line.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            found.append((keyword.upper(), arguments.strip()))
            pending = ""
    return found


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions, its FROM first."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, arguments in instructions(path):
        if keyword == "FROM":
            current = [(keyword, arguments)]
            name = re.search(r"\bAS\s+(\S+)$", arguments, re.IGNORECASE)
            result[name.group(1) if name else f"stage-{len(result)}"] = current
        else:
            current.append((keyword, arguments))
    return result


def test_hadolint_reports_no_warning_or_error() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_pinned_by_tag() -> None:
    names = set(stages(DOCKERFILE))

    for name, body in stages(DOCKERFILE).items():
        image = body[0][1].split()[0]
        if image in names:
            continue  # a stage of this file
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: FROM {image}"


def test_every_image_runs_unprivileged_with_a_health_check_and_an_entrypoint() -> None:
    built = stages(DOCKERFILE)

    for image in IMAGES:
        keywords = {keyword: arguments for keyword, arguments in built[image]}
        user = keywords.get("USER", "")
        assert re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", user), f"{image}: USER {user!r}"
        assert "healthcheck.sh" in keywords.get("HEALTHCHECK", ""), image
        assert "entrypoint-" in keywords.get("ENTRYPOINT", ""), image


def lineage(built: dict[str, list[tuple[str, str]]], name: str) -> list[tuple[str, str]]:
    """The instructions an image is built from: its stage's, after those of the stages of
    this file it starts FROM."""
    body = built[name]
    parent = body[0][1].split()[0]
    return [*(lineage(built, parent) if parent in built else []), *body]


def apt_packages(command: str) -> list[str]:
    """The packages of each `apt-get install` in a RUN's command, versions dropped."""
    found = []
    for install in re.findall(r"apt-get\s+install\s+([^&;|]*)", command):
        found += [word.split("=")[0] for word in install.split() if not word.startswith("-")]
    return found


def test_coordinator_image_installs_nginx_and_its_lua_module_from_debian() -> None:
    built = lineage(stages(DOCKERFILE), "coordinator")
    runs = [arguments for keyword, arguments in built if keyword == "RUN"]
    installs = [command for command in runs if apt_packages(command)]

    packages = {package for command in installs for package in apt_packages(command)}
    assert "libnginx-mod-http-lua" in packages, packages
    assert packages & {"nginx", "nginx-light"}, packages
    for command in installs:
        assert "--no-install-recommends" in command, command
        assert "rm -rf /var/lib/apt/lists/*" in command, f"apt lists stay in the image: {command}"
    keywords = [keyword for keyword, _ in built]
    first_install = next(i for i, (k, a) in enumerate(built) if k == "RUN" and a in installs)
    assert keywords.index("USER") > first_install, "apt-get runs as root, before USER"


def test_only_the_coordinator_image_carries_nginx() -> None:
    built = stages(DOCKERFILE)

    for image in ("node", "node-cuda", "dashboard"):
        packages = [
            package
            for keyword, arguments in lineage(built, image)
            if keyword == "RUN"
            for package in apt_packages(arguments)
        ]
        assert not [package for package in packages if "nginx" in package], image


def test_coordinator_image_exposes_the_gateway_port_only() -> None:
    built = stages(DOCKERFILE)["coordinator"]

    exposed = [arguments.split() for keyword, arguments in built if keyword == "EXPOSE"]
    environment = " ".join(arguments for keyword, arguments in built if keyword == "ENV")

    assert exposed == [[GATEWAY_PORT]]
    assert f"FEDTUNE_PORT={GATEWAY_PORT}" in environment
    assert f"FEDTUNE_SUPERLINK_PORT={SUPERLINK_PORT}" in environment


def test_no_image_copies_a_key_certificate_or_secret() -> None:
    for keyword, arguments in instructions(DOCKERFILE):
        assert keyword != "ADD", f"ADD {arguments}: use COPY (ADD fetches URLs, unpacks archives)"
        if keyword == "COPY" and "--from=" not in arguments:
            sources = [word for word in arguments.split()[:-1] if not word.startswith("--")]
            risky = [source for source in sources if SECRET_PATH.search(source)]
            assert not risky, f"COPY {arguments}"
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + arguments)
            risky = [name for name in names if SECRET_NAME.search(name)]
            assert not risky, f"{keyword} {arguments}: secrets come at run time, not in the image"


def test_build_context_lets_in_only_the_package_and_the_scripts() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert rules[0] == "*", ".dockerignore must exclude everything first, then allow"
    allowed = [rule[1:] for rule in rules if rule.startswith("!")]
    assert not [rule for rule in allowed if SECRET_PATH.search(rule)], allowed
    for pattern in ("**/*.pem", "**/*.key", "**/.env"):
        assert pattern in rules
    for keyword, arguments in instructions(DOCKERFILE):
        if keyword == "COPY" and "--from=" not in arguments:
            for source in [w for w in arguments.split()[:-1] if not w.startswith("--")]:
                assert any(
                    source.rstrip("/") == rule.rstrip("/")
                    or re.fullmatch(re.escape(rule).replace(r"\*", "[^/]*"), source)
                    for rule in allowed
                ), f"COPY {source}: not in the build context (.dockerignore)"
                assert (ROOT / source).exists(), f"COPY {source}: no such file"


# --- the container scripts -----------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_with_bash(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


def test_scripts_pass_shellcheck() -> None:
    result = subprocess.run(
        [tool("shellcheck"), "--external-sources", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_scripts_use_strict_mode_and_exec_their_command() -> None:
    for script in DOCKER.glob("entrypoint-*.sh"):
        text = script.read_text(encoding="utf-8")
        assert "set -euo pipefail" in text, script.name
        assert re.search(r"^exec fedtune ", text, re.MULTILINE), f"{script.name}: exec the command"
        assert 'exec "$@"' in text, f"{script.name}: run given arguments instead"


# --- compose.yaml --------------------------------------------------------------------------


def compose(path: Path = COMPOSE_FILES[0]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_follows_the_compose_specification(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", SCHEMA, str(path)],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def compose_cli() -> list[str] | None:
    """A Compose v2 command line, if one is installed (`docker compose`, `docker-compose`)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run([*command, "version", "--short"], capture_output=True, text=True)
        if version.returncode == 0 and re.match(r"v?2\.", version.stdout.strip()):
            return command
    return None


def test_compose_cli_accepts_the_files() -> None:
    command = compose_cli()
    if command is None:
        pytest.skip("no Docker Compose v2 here; the schema test above still checks the files")
    arguments = [part for path in COMPOSE_FILES for part in ("-f", str(path))]

    result = subprocess.run(
        [*command, *arguments, "config", "--quiet"], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr


def test_compose_services_volumes_secrets_and_checks_fit_together() -> None:
    spec = compose()
    services: dict[str, dict[str, Any]] = spec["services"]
    stage_names = set(stages(DOCKERFILE))
    volumes, used_secrets = set(spec["volumes"]), set(spec["secrets"])

    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        for secret in service.get("secrets", []):
            assert secret in used_secrets, f"{name}: secret {secret} is not declared"
        for other, condition in service.get("depends_on", {}).items():
            assert other in services, f"{name} depends on unknown {other}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[other], f"{other} has no health check"
            if condition["condition"] == "service_completed_successfully":
                assert services[other].get("restart") == "no", f"{other} must run once"
        if service.get("restart") == "unless-stopped":
            assert "healthcheck" in service, f"{name} runs for good without a health check"
        if "build" in service:
            assert service["build"]["target"] in stage_names, name
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image}"
        if service.get("pull_policy") == "never":
            built = {other["image"] for other in services.values() if "build" in other}
            assert image in built, f"{name}: nothing builds {image}"


def published_container_ports(service: dict[str, Any]) -> list[str]:
    """The container side of each published port (short or long syntax)."""
    found = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.append(str(entry["target"]))
        else:
            found.append(str(entry).rsplit(":", 1)[-1].split("/")[0])
    return found


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_publishes_the_gateway_port_and_never_the_superlinks(path: Path) -> None:
    services: dict[str, dict[str, Any]] = compose(path)["services"]

    for name, service in services.items():
        assert SUPERLINK_PORT not in published_container_ports(service), name
        assert SUPERLINK_PORT not in [str(port) for port in service.get("expose", [])], name
        assert service.get("network_mode") != "host", f"{name}: host networking"
    if path == COMPOSE_FILES[0]:
        coordinator = services["coordinator"]
        assert published_container_ports(coordinator) == [GATEWAY_PORT]
        assert coordinator["environment"]["FEDTUNE_PORT"] == GATEWAY_PORT
        assert coordinator["environment"]["FEDTUNE_SUPERLINK_PORT"] == SUPERLINK_PORT
        # enroll reaches the SuperLink on 127.0.0.1 of the coordinator's network namespace.
        assert services["enroll"]["network_mode"] == "service:coordinator"


def test_only_the_ca_holders_mount_the_ca_key_and_certify_runs_offline() -> None:
    services: dict[str, dict[str, Any]] = compose()["services"]
    holders = {
        name
        for name, service in services.items()
        if any(mount.split(":")[0] == "ca-private" for mount in service.get("volumes", []))
    }

    assert holders == {"init-coordinator", "certify"}
    assert services["certify"]["network_mode"] == "none"
    assert "ca-private:/etc/fedtune/ca:ro" in services["certify"]["volumes"]
    assert services["enroll"]["depends_on"]["certify"]["condition"] == (
        "service_completed_successfully"
    )


def test_compose_file_holds_no_secret_value() -> None:
    spec = compose()

    for name, service in spec["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key.removesuffix("_FILE")) and not key.endswith("_FILE"):
                pytest.fail(f"{name}: {key} holds a secret; give a *_FILE from a secret instead")
            if "postgresql" in str(value):
                userinfo = str(value).split("://", 1)[1].split("@", 1)[0]
                assert ":" not in userinfo, f"{name}: {key} has a password in its URL"
    for secret in spec["secrets"].values():
        path = (DOCKER / secret["file"]).resolve()
        assert path.parent == DOCKER / "secrets", f"secret files live in docker/secrets: {path}"
    assert "/secrets/" in (DOCKER / ".gitignore").read_text(encoding="utf-8").split()


def test_compose_configs_are_valid_and_match_the_images_paths() -> None:
    nodes = {name: load_node_config(DOCKER / "config" / f"{name}.toml") for name in NODES}
    run = load_run_config(DOCKER / "config" / "run.toml")

    for name, config in nodes.items():
        assert config.node.name == name
        assert config.node.state_dir == Path("/var/lib/fedtune/node")  # the image's STATE_DIR
        assert config.coordinator is not None
        assert config.coordinator.address == "coordinator:9092"  # a name in the certificate
    assert [node.name for node in run.nodes] == list(NODES)
    assert run.output.dir.is_relative_to("/var/lib/fedtune/coordinator")  # a writable volume


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
