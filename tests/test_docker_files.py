"""docker/, read: the Dockerfile lints clean (hadolint), compose.yaml is a valid Compose file
whose services, volumes, secrets and health checks fit together, no image takes in a key or a
secret, the coordinator image carries the gateway (Debian's nginx and its Lua module),
compose publishes the gateway's port only and only the CA's holders mount its key, and the
scripts pass shellcheck. The scripts at work are in test_docker_entrypoints.py.

There is no Docker engine here: images are never built in these tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.platform.config import load_node_config, load_run_config

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
