"""The coordinator's Flower processes: its SuperLink (TLS, SuperNode authentication) and the
Flower CLI that enrolls nodes and submits runs to it.

The SuperLink keeps its state in ``STATE_DIR/superlink.db``, so enrolled nodes survive a
restart. The Flower CLI's configuration lives in ``STATE_DIR/flwr`` (``FLWR_HOME``) with one
connection, ``fedtune``. A run is submitted as a small Flower app folder whose run config holds
the run's whole definition (:class:`~fedtune.coordinator.deployment.DeploymentJob`); its
components are fedtune's installed ServerApp and ClientApp.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from fedtune.coordinator.job import JOB_KEY, DeploymentJob
from fedtune.platform.config import CoordinatorConfig, RunConfig
from fedtune.platform.flower_tools import flower_command, tool_path_environment
from fedtune.platform.processes import end_process_tree
from fedtune.platform.tls import CertificatePaths, check_certificates

CONNECTION = "fedtune"
SUBMISSION_FILE = "submission.json"  # in a run's app folder: its Flower run id
SERVER_APP = "fedtune.coordinator.deployed_app:app"
CLIENT_APP = "fedtune.client_node.deployed_app:app"


class CoordinatorError(RuntimeError):
    """The coordinator cannot start, or the Flower CLI refused a request."""


def flwr_home(config: CoordinatorConfig) -> Path:
    return config.coordinator.state_dir / "flwr"


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
        "--database",
        str(config.coordinator.state_dir / "superlink.db"),
        "--host",
        config.coordinator.host,
        "--port",
        str(config.coordinator.port),
    ]


def prepare(config: CoordinatorConfig) -> None:
    """Check the TLS files and write the Flower CLI's connection to this SuperLink."""
    paths = CertificatePaths(
        ca_cert=config.tls.ca_certificate,
        ca_key=config.tls.ca_certificate.with_name("ca.key"),
        server_cert=config.tls.certificate,
        server_key=config.tls.private_key,
    )
    host = config.address.rsplit(":", 1)[0]
    problems = check_certificates(paths, hosts=[host])
    if problems:
        raise CoordinatorError("TLS files are not usable:\n  " + "\n  ".join(problems))
    home = flwr_home(config)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{config.address}"\n'
        f"root-certificates = {json.dumps(str(config.tls.ca_certificate))}\n",
        encoding="utf-8",
    )


def flower_environment(config: CoordinatorConfig) -> dict[str, str]:
    """The SuperLink starts further Flower commands by name: they must be on PATH."""
    return {**tool_path_environment(), "FLWR_HOME": str(flwr_home(config))}


class SuperLinkSupervisor:
    """Runs the SuperLink in the foreground and restarts it when it exits or loses the
    SuperExec that starts ServerApps (seen under heavy load with its SQLite state: "database
    is locked", then no run ever starts). Runs in progress then need `fedtune run resume`."""

    CHECK_S = 5.0
    MISSING_CHECKS = 3  # SuperExec absent this many checks in a row: restart

    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        while not self._stopping.is_set():
            self._process = process = subprocess.Popen(
                superlink_command(self.config),
                env=flower_environment(self.config),
                start_new_session=True,
            )
            reason = self._watch(process)
            end_process_tree(process.pid)
            if self._stopping.is_set():
                return
            print(f"coordinator: {reason}; restarting the SuperLink", flush=True)
            self._stopping.wait(self.CHECK_S)

    def _watch(self, process: subprocess.Popen[bytes]) -> str:
        missing = 0
        started = time.monotonic()
        while not self._stopping.wait(self.CHECK_S):
            if process.poll() is not None:
                return f"the SuperLink exited with code {process.returncode}"
            if time.monotonic() - started < 30:
                continue  # SuperExec starts a few seconds after the SuperLink
            missing = 0 if _has_superexec(process.pid) else missing + 1
            if missing >= self.MISSING_CHECKS:
                return "the SuperLink lost its SuperExec (no run could start)"
        return "stopped"

    def stop(self) -> None:
        self._stopping.set()


def _has_superexec(pid: int) -> bool:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    return any("flower-superexec" in " ".join(_cmdline(child)) for child in children)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


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
    """The Flower app folder of one run: metadata and the job; no code of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "fedtune-run"\n'
        'version = "1.0.0"\n'
        'description = "A fedtune federated DP-LoRA run"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedtune"\n\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{SERVER_APP}"\n'
        f'clientapp = "{CLIENT_APP}"\n\n'
        "[tool.flwr.app.config]\n"
        f"{JOB_KEY} = {json.dumps(job.model_dump_json())}\n",
        encoding="utf-8",
    )


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
        }
    )
    return DeploymentJob(
        run_id=run_id, run=run.model_copy(update={"output": output}), resume=resume
    )
