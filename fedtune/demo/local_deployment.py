"""A real deployment on one machine: the coordinator and the nodes as separate `fedtune`
processes on 127.0.0.1, with TLS, node authentication, secure aggregation and encrypted
checkpoints. `fedtune demo --deployment`, the deployment tests and the SecAgg+ benchmark use it.

Each process gets its own process group and log file under ``WORKDIR/logs``; :meth:`stop`
ends every one of them (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w
from sqlalchemy import select

from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import ENCRYPTED_WEIGHTS_FILE
from fedtune.coordinator.enrollment import ENROLLMENT_FILE, enroll_node
from fedtune.coordinator.gateway import (
    FLEET_PATHS,
    GatewayError,
    gateway_folder,
    wait_until_healthy,
)
from fedtune.coordinator.run_summary import format_summary, run_summary
from fedtune.coordinator.superlink import deployment_job, submit_run, superlink_command
from fedtune.demo.run import DEMO_NODES, demo_dtype, prepare_demo_folder
from fedtune.platform.config import (
    CoordinatorConfig,
    RunConfig,
    load_coordinator_config,
    load_run_config,
)
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import Run, open_database
from fedtune.platform.runtime.processes import end_process_tree
from fedtune.platform.security.encryption import generate_key_file
from fedtune.platform.security.enrollment_certificates import certify_enrollment_file
from fedtune.platform.security.tls import CertificatePaths, init_certificates
from fedtune.privacy.ledger_store import LedgerEntryRow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fedtune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


class LocalDeployment:
    """Coordinator and nodes under ``workdir``; use as a context manager."""

    def __init__(self, workdir: Path, *, encrypt_checkpoints: bool = True):
        self.workdir = workdir.resolve()
        self.encrypt_checkpoints = encrypt_checkpoints
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.coordinator_toml = self.workdir / "coordinator.toml"
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def coordinator(self) -> CoordinatorConfig:
        return load_coordinator_config(self.coordinator_toml)

    def init_coordinator(self) -> CoordinatorConfig:
        """Certificates, checkpoint key and coordinator.toml (a free port on 127.0.0.1)."""
        certs = init_certificates(self.workdir / "certs")
        coordinator: dict[str, Any] = {
            "state_dir": "coordinator",
            "host": "127.0.0.1",
            "port": free_port(),
            "superlink_port": free_port(),
        }
        if self.encrypt_checkpoints:
            generate_key_file(self.workdir / "secrets" / "checkpoint.key")
            coordinator["encryption_key_file"] = "secrets/checkpoint.key"
        tls = {
            "ca_certificate": str(certs.ca_cert.relative_to(self.workdir)),
            "certificate": str(certs.server_cert.relative_to(self.workdir)),
            "private_key": str(certs.server_key.relative_to(self.workdir)),
        }
        self.coordinator_toml.write_text(
            tomli_w.dumps({"coordinator": coordinator, "tls": tls}), encoding="utf-8"
        )
        return self.coordinator

    def start_coordinator(self, *, timeout_s: float = 90) -> None:
        """Start `fedtune coordinator start`; return when its gateway answers."""
        config = self.coordinator
        self._start("coordinator", "coordinator", "start", "--config", str(self.coordinator_toml))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                wait_until_healthy(config, timeout_s=1)
                return
            except GatewayError:
                if self.processes["coordinator"].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the coordinator did not start; see {self.log('coordinator')}"
                    ) from None

    def add_node(
        self,
        name: str,
        *,
        sections: Mapping[str, Mapping[str, Any]],
        coordinator: Mapping[str, Any] | None = None,
        min_secure_peers: int | None = None,
    ) -> Path:
        """Keys for node ``name`` and its node.toml: ``sections`` are the tables other than
        [node] and [coordinator], ``coordinator`` adds keys to that one, ``min_secure_peers``
        is its setting (e.g. 2 for a federation of two); returns the node.toml."""
        folder = self.workdir / "nodes" / name
        subprocess.run(
            fedtune_command("node", "keygen", "--out", str(folder / "state")),
            check=True,
            capture_output=True,
        )
        config = self.coordinator
        node_toml = folder / "node.toml"
        connection: dict[str, Any] = {
            "address": config.public_address,
            "root_certificates": str(config.tls.ca_certificate),
            "auth_key": "state/auth_key",
            **({"min_secure_peers": min_secure_peers} if min_secure_peers else {}),
            **(coordinator or {}),
        }
        document = {
            "node": {"name": name, "state_dir": "state"},
            **sections,
            "coordinator": connection,
        }
        node_toml.write_text(tomli_w.dumps(document), encoding="utf-8")
        return node_toml

    def enroll(self, name: str) -> str:
        """Certify node ``name``'s keys (this demo holds the consortium's CA key) and enroll
        them; its SuperNode id."""
        folder = self.workdir / "nodes" / name
        certified = folder / "enrollment.certified.json"
        certified.unlink(missing_ok=True)  # keys rotated since: certify the new ones
        certify_enrollment_file(
            folder / "state" / ENROLLMENT_FILE,
            name=name,
            ca_key=CertificatePaths.in_dir(self.workdir / "certs").ca_key,
            out=certified,
        )
        return enroll_node(self.coordinator, certified, name=name)

    def start_node(self, name: str) -> None:
        node_toml = self.workdir / "nodes" / name / "node.toml"
        self._start(f"node-{name}", "node", "start", "--config", str(node_toml))

    def submit(self, run_toml: Path, *, run_id: str | None = None, resume: bool = False) -> str:
        from fedtune.coordinator.job import new_run_id

        run_id = run_id or new_run_id()
        if resume:
            from fedtune.coordinator.run_registry import stored_run_config

            run = stored_run_config(self.coordinator, run_id)
        else:
            run = load_run_config(run_toml)
        submit_run(
            self.coordinator, deployment_job(self.coordinator, run, run_id=run_id, resume=resume)
        )
        return run_id

    def run_status(self, run_id: str) -> tuple[str | None, int]:
        """The run's status in the coordinator's database (None: not registered yet) and
        how many rounds it has recorded."""
        from fedtune.coordinator.run_registry import run_statuses

        found = [
            s for s in run_statuses(self.coordinator, run_id=run_id) if s["status"] != "submitted"
        ]
        return (found[0]["status"], found[0]["rounds_done"]) if found else (None, 0)

    def wait_for_run(
        self,
        run_id: str,
        *,
        timeout_s: float,
        until_rounds: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> str:
        """Wait until the run ends (or has ``until_rounds`` rounds); its status."""
        deadline = time.monotonic() + timeout_s
        seen = -1
        while time.monotonic() < deadline:
            status, rounds = self.run_status(run_id)
            if progress is not None and rounds != seen:
                seen = rounds
                progress(f"run {run_id}: {status or 'starting'}, {rounds} rounds recorded")
            if status in ("finished", "failed"):
                return status
            if until_rounds is not None and rounds >= until_rounds:
                return status or "running"
            for name, process in self.processes.items():
                if name == "coordinator" and process.poll() is not None:
                    raise RuntimeError(f"the coordinator exited; see {self.log('coordinator')}")
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} did not end within {timeout_s:g} s")

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _start(self, name: str, *args: str) -> None:
        with self.log(name).open("ab") as log:
            self.processes[name] = subprocess.Popen(
                fedtune_command(*args),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self, name: str, *, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name`` and everything it started."""
        process = self.processes.pop(name)
        end_process_tree(process.pid, first=sig)
        process.wait(timeout=5)

    def stop(self) -> None:
        """End every process this deployment started (nodes first)."""
        for name in sorted(self.processes, key=lambda n: n == "coordinator"):
            end_process_tree(self.processes[name].pid)
            self.processes[name].wait(timeout=10)
        self.processes.clear()


def demo_node_sections(
    *, model: str, data: Path, name: str, dtype: str = "float32"
) -> dict[str, dict[str, Any]]:
    """A deployment demo node's node.toml tables other than [node] and [coordinator]."""
    return {
        "model": {"spec": model, "dtype": dtype},
        "data": {
            "train": str(data / name / "train.jsonl"),
            "eval": str(data / name / "held_out.jsonl"),
            "max_length": 128,
            "max_eval_examples": 48,
        },
        # torch_threads: the two nodes train at the same time on this machine
        "training": {"physical_batch_size": 16, "torch_threads": 1},
        "privacy": {"mode": "dp", "target_epsilon": 8.0, "delta": 1e-5},
    }


def demo_run(*, rounds: int, steps: int, model: str, secure: bool = True) -> dict[str, Any]:
    """The deployment demo's run.toml, as data."""
    return {
        "run": {"name": "demo-deployment", "rounds": rounds, "min_nodes": 2},
        "model": {"spec": model},
        "training": {"steps": steps, "batch_size": 32, "learning_rate": 0.01},
        "aggregation": {"secure": secure},
        "nodes": [{"name": name} for name in DEMO_NODES],
        "output": {"dir": "coordinator/run"},
    }


def protections_of(coordinator: CoordinatorConfig, run_id: str) -> dict[str, str]:
    """The protections run ``run_id`` had, read from what the coordinator ran and stored."""
    protections = {
        "tls": f"TLS to the coordinator, certificates of the CA {coordinator.tls.ca_certificate}",
    }
    command = superlink_command(coordinator)
    if "--enable-supernode-auth" in command:
        protections["node_authentication"] = "only SuperNodes with enrolled ECDSA P-384 keys"
    gateway_conf = gateway_folder(coordinator) / "nginx.conf"
    if command[command.index("--host") + 1] == "127.0.0.1" and gateway_conf.is_file():
        forwarded = sum(f"location = {path} " in gateway_conf.read_text() for path in FLEET_PATHS)
        protections["gateway"] = (
            f"nginx at {coordinator.public_address} forwards the Fleet API only ({forwarded} "
            "paths), refuses replayed node logins; the SuperLink listens on 127.0.0.1"
        )
    if "--superexec-auth-secret-file" in command:
        protections["pinned_apps"] = (
            "only fedtune's own ServerApp and ClientApp run: run bundles checked before "
            "install, tasks only for the SuperExec holding the secret, tokens on stdin"
        )
    with transaction(open_database(coordinator.database_url)) as session:
        run = session.get(Run, run_id)
        if run is None:
            return protections
        config = RunConfig.model_validate(run.config)
        epsilons = {
            r.node: r.epsilon_after
            for r in privacy_records(session, run_id)
            if r.mode == "dp" and r.signed
        }
        copies = session.scalars(
            select(LedgerEntryRow.id).where(LedgerEntryRow.run_id == run_id)
        ).all()
    if config.aggregation.secure:
        protections["secure_aggregation"] = (
            "Flower SecAgg+ with fedtune's masks (ChaCha20 keyed by the whole seed), checked "
            "by each node: only masked updates and their mean"
        )
    if config.aggregation.node_dp is not None:
        protections["node_level_dp"] = "clipped updates, noise on the mean, coordinator's ledger"
    if epsilons:
        protections["differential_privacy"] = "DP-SGD at " + ", ".join(
            f"{node} (epsilon {eps:.2f})" for node, eps in sorted(epsilons.items()) if eps
        )
    if copies:
        protections["signed_ledger"] = f"{len(copies)} signed ledger entries verified and kept"
    adapters = config.output.dir / "adapters"
    if any(adapters.glob(f"round-*/{ENCRYPTED_WEIGHTS_FILE}")):
        protections["checkpoint_encryption"] = "global adapters encrypted at rest (AES-256-GCM)"
    return protections


def run_deployment_demo(
    workdir: Path,
    *,
    rounds: int = 3,
    steps: int = 4,
    model: str = "smollm2-135m",
    dtype: str = "auto",
    secure: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The two-node demo as a real deployment on 127.0.0.1; returns the summary.

    ``secure=False`` sends the updates in the clear (the nodes are told to accept that): only
    for comparing a plain run with a secure one of the same work
    (``benchmarks/secure_vs_plain_deployment.py``)."""
    dtype = demo_dtype(dtype)
    model = prepare_demo_folder(workdir, rounds=rounds, steps=steps, model=model)
    data = workdir.resolve() / "data"
    with LocalDeployment(workdir) as deployment:
        config = deployment.init_coordinator()
        progress(
            f"coordinator: TLS certificates in {workdir / 'certs'}, port {config.coordinator.port}"
        )
        deployment.start_coordinator()
        for name in DEMO_NODES:
            deployment.add_node(
                name,
                sections=demo_node_sections(model=model, data=data, name=name, dtype=dtype),
                # Two nodes: each learns the other's (DP-noised) update from the secure mean,
                # which a demo accepts knowingly; a consortium keeps the default of 3.
                min_secure_peers=len(DEMO_NODES),
                coordinator=None if secure else {"require_secure_aggregation": False},
            )
            deployment.enroll(name)
            deployment.start_node(name)
            progress(
                f"node {name}: keys made, enrolled, started, base weights in {dtype} "
                f"(log {deployment.log('node-' + name)})"
            )
        run_toml = workdir / "run.toml"
        run_toml.write_text(
            "# The deployment demo's run: `fedtune run start --config run.toml --coordinator "
            "coordinator.toml`\n"
            + tomli_w.dumps(demo_run(rounds=rounds, steps=steps, model=model, secure=secure)),
            encoding="utf-8",
        )
        run_id = deployment.submit(run_toml)
        aggregation = "SecAgg+" if secure else "plain aggregation (updates in the clear)"
        progress(f"run {run_id} submitted: {rounds} rounds of {steps} DP-SGD steps, {aggregation}")
        status = deployment.wait_for_run(run_id, timeout_s=3600, progress=progress)
        engine = open_database(config.database_url)
        if status != "finished":
            with transaction(engine) as session:
                run = session.get(Run, run_id)
                error = run.error if run is not None else "unknown"
            raise RuntimeError(f"run {run_id} {status}: {error}; logs in {workdir / 'logs'}")
    summary = run_summary(engine, run_id)
    protections = protections_of(config, run_id)
    summary["deployment"] = {
        "coordinator": config.public_address,
        "nodes": list(DEMO_NODES),
        "protections": protections,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    progress(format_summary(summary))
    progress(
        "protections on: " + "; ".join(protections.values()) + "\n"
        f"coordinator database {config.database_url}; logs {workdir / 'logs'}; summary "
        f"{workdir / 'summary.json'}\n"
        f"see it all: `fedtune dashboard --db {config.database_url}`"
    )
    return summary
