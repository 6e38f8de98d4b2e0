"""The coordinator's Flower processes: its SuperLink (TLS, SuperNode authentication, on
127.0.0.1 only), the SuperExec that starts its ServerApps, the gateway (nginx) that holds the
public address, and the Flower CLI that enrolls nodes and submits runs on this host.

The SuperLink keeps its state in ``STATE_DIR/superlink.db``, so enrolled nodes survive a
restart. The Flower CLI's configuration lives in ``STATE_DIR/flwr`` (``FLWR_HOME``) with one
connection, ``fedtune``, to 127.0.0.1. A run is submitted as a small Flower app folder whose run
config holds the run's whole definition (:class:`~fedtune.coordinator.deployment.DeploymentJob`);
its components are fedtune's installed ServerApp and ClientApp.

The state folder is 0700 and what the coordinator writes there 0600 (its databases hold node
keys, run definitions and per-node metrics).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

from fedtune.common.errors import FedtuneError
from fedtune.coordinator import gateway
from fedtune.coordinator.job import JOB_KEY, DeploymentJob
from fedtune.coordinator.run_protections import deployment_facts
from fedtune.platform.config import CoordinatorConfig, RunConfig
from fedtune.platform.runtime.flower_tools import flower_command, tool_path_environment
from fedtune.platform.runtime.processes import end_process_tree
from fedtune.platform.security.tls import SUPERLINK_HOSTS, CertificatePaths, check_certificates
from fedtune.platform.wire.pinned_apps import SECRET_FILE, ensure_secret
from fedtune.platform.wire.run_bundle import CLIENT_APP, SERVER_APP

CONNECTION = "fedtune"
SUBMISSION_FILE = "submission.json"  # in a run's app folder: its Flower run id


class CoordinatorError(FedtuneError, RuntimeError):
    """The coordinator cannot start, or the Flower CLI refused a request."""


def flwr_home(config: CoordinatorConfig) -> Path:
    return config.coordinator.state_dir / "flwr"


def superexec_secret(config: CoordinatorConfig) -> Path:
    return config.coordinator.state_dir / SECRET_FILE


def superlink_command(config: CoordinatorConfig) -> list[str]:
    tls = config.tls
    return [
        flower_command("flower-superlink"),
        "--ssl-ca-certfile",
        str(tls.ca_certificate),
        "--ssl-certfile",
        str(tls.certificate),
        "--ssl-keyfile",
        str(tls.private_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",  # fedtune is installed; no network
        # ServerApps are started by fedtune's SuperExec, which must hold this secret to
        # acquire a task (in subprocess isolation anyone could).
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(superexec_secret(config)),
        "--database",
        str(config.coordinator.state_dir / "superlink.db"),
        "--host",
        "127.0.0.1",  # never public: the gateway forwards the Fleet API only
        "--port",
        str(config.coordinator.superlink_port),
    ]


def superexec_command(config: CoordinatorConfig, *, superlink_pid: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedtune.coordinator.superexec",
        "--runtime-api-address",
        config.superlink_address,
        "--root-certificates",
        str(config.tls.ca_certificate),
        "--superexec-auth-secret-file",
        str(superexec_secret(config)),
        "--parent-pid",
        str(superlink_pid),
    ]


def prepare(config: CoordinatorConfig) -> None:
    """Check the TLS files, make the state folder private, write the Flower CLI's connection
    to the SuperLink, the SuperExec secret and the gateway's configuration."""
    paths = CertificatePaths(
        ca_cert=config.tls.ca_certificate,
        ca_key=config.tls.ca_certificate.with_name("ca.key"),
        server_cert=config.tls.certificate,
        server_key=config.tls.private_key,
    )
    public_host = config.public_address.rsplit(":", 1)[0]
    problems = check_certificates(paths, hosts=sorted({*SUPERLINK_HOSTS, public_host}))
    if problems:
        raise CoordinatorError("TLS files are not usable:\n  " + "\n  ".join(problems))
    state = config.coordinator.state_dir
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    for name in ("fedtune.db", "superlink.db"):
        if (state / name).exists():
            (state / name).chmod(0o600)
    home = flwr_home(config)
    home.mkdir(parents=True, exist_ok=True)
    connection = {
        "address": config.superlink_address,
        "root-certificates": str(config.tls.ca_certificate),
    }
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}),
        encoding="utf-8",
    )
    ensure_secret(superexec_secret(config))
    try:
        gateway.write_config(config)
    except gateway.GatewayError as exc:
        raise CoordinatorError(str(exc)) from None


def flower_environment(config: CoordinatorConfig) -> dict[str, str]:
    """The SuperLink starts further Flower commands by name: they must be on PATH."""
    return {**tool_path_environment(), "FLWR_HOME": str(flwr_home(config))}


class CoordinatorSupervisor:
    """Runs the SuperLink, fedtune's SuperExec and the gateway in the foreground, and restarts
    all three when one of them exits (the SuperLink has been seen to lose its SuperExec under
    heavy load with its SQLite state: "database is locked"). Runs in progress then need
    `fedtune run resume`."""

    CHECK_S = 2.0
    START_TIMEOUT_S = 60.0

    def __init__(self, config: CoordinatorConfig, *, say: Callable[[str], None] = print):
        self.config = config
        self.say = say
        self._stopping = threading.Event()
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._start_all()
                reason = self._watch()
            except CoordinatorError as exc:
                reason = str(exc)
            self._end_all()
            if self._stopping.is_set():
                return
            self.say(f"coordinator: {reason}; restarting")
            self._stopping.wait(self.CHECK_S)

    def _start_all(self) -> None:
        config = self.config
        environment = flower_environment(config)
        superlink = self._start("SuperLink", superlink_command(config), environment)
        _wait_for_port(config.coordinator.superlink_port, superlink, self.START_TIMEOUT_S)
        self._start(
            "SuperExec", superexec_command(config, superlink_pid=superlink.pid), environment
        )
        self._start("gateway", gateway.gateway_command(config), environment)
        try:
            gateway.wait_until_healthy(config, timeout_s=self.START_TIMEOUT_S)
        except gateway.GatewayError as exc:
            raise CoordinatorError(str(exc)) from None
        self.say(
            f"coordinator: gateway on {config.coordinator.host}:{config.coordinator.port} "
            f"(Fleet API only), SuperLink on {config.superlink_address}"
        )

    def _start(
        self, name: str, command: list[str], environment: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, env=environment, start_new_session=True)
        self._processes[name] = process
        return process

    def _watch(self) -> str:
        while not self._stopping.wait(self.CHECK_S):
            for name, process in self._processes.items():
                if process.poll() is not None:
                    return f"the {name} exited with code {process.returncode}"
        return "stopped"

    def _end_all(self) -> None:
        for process in reversed(list(self._processes.values())):
            end_process_tree(process.pid)
            process.wait(timeout=30)
        self._processes.clear()

    def stop(self) -> None:
        self._stopping.set()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if process.poll() is not None:
                raise CoordinatorError(
                    f"the SuperLink exited with code {process.returncode} (is port {port} "
                    "in use? coordinator.superlink_port)"
                ) from None
            if time.monotonic() > deadline:
                raise CoordinatorError(f"the SuperLink does not listen on port {port}") from None
            time.sleep(0.3)


def flwr(config: CoordinatorConfig, *args: str, timeout: float = 120) -> str:
    """Run the Flower CLI against this coordinator; its output, or a CoordinatorError."""
    result = subprocess.run(
        [flower_command("flwr"), *args],
        env={**flower_environment(config), "NO_COLOR": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        detail = (result.stdout + result.stderr).strip().splitlines()
        raise CoordinatorError(
            f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed: "
            + " ".join(line.strip() for line in detail[-6:])
        )
    return result.stdout


def submit_run(config: CoordinatorConfig, job: DeploymentJob) -> str:
    """Submit ``job`` to the SuperLink; returns Flower's run id."""
    folder = (
        config.coordinator.state_dir / "apps" / (job.run_id + ("-resume" if job.resume else ""))
    )
    write_app(folder, job)
    output = flwr(config, "run", str(folder), CONNECTION, "--format", "json", timeout=300)
    try:
        flower_run_id = str(json.loads(output)["run-id"])
    except (json.JSONDecodeError, KeyError):
        raise CoordinatorError(f"flwr run answered: {output.strip()[-300:]}") from None
    (folder / SUBMISSION_FILE).write_text(
        json.dumps(
            {
                "run_id": job.run_id,
                "flower_run_id": flower_run_id,
                "resume": job.resume,
                "submitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ),
        encoding="utf-8",
    )
    return flower_run_id


def write_app(folder: Path, job: DeploymentJob) -> None:
    """The Flower app folder of one run: metadata and the job; no code of its own (the
    coordinator and the nodes refuse any other bundle: platform/wire/run_bundle.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUBMISSION_FILE).unlink(missing_ok=True)  # from an earlier submission
    app = {
        "publisher": "fedtune",
        "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
        "config": {JOB_KEY: job.model_dump_json()},
    }
    document = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedtune-run",
            "version": "1.0.0",
            "description": "A fedtune federated DP-LoRA run",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {"flwr": {"app": app}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(document), encoding="utf-8")


def deployment_job(
    coordinator: CoordinatorConfig, run: RunConfig, *, run_id: str, resume: bool = False
) -> DeploymentJob:
    """The job for ``run`` on this coordinator: its database and checkpoint key are the
    coordinator's."""
    output = run.output.model_copy(
        update={
            "database": coordinator.database_url,
            "encryption_key_file": coordinator.coordinator.encryption_key_file
            or run.output.encryption_key_file,
            "witness_key_file": coordinator.witness_key_path,
        }
    )
    return DeploymentJob(
        run_id=run_id,
        run=run.model_copy(update={"output": output}),
        resume=resume,
        coordinator=deployment_facts(coordinator, superlink_command(coordinator)),
    )
