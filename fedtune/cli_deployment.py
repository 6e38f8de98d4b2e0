"""The `fedtune` commands of a multi-site deployment: certificates, the coordinator, runs
against it, and a node's keys and SuperNode."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from fedtune.common.errors import AlreadyExistsError
from fedtune.platform.config import load_coordinator_config, load_run_config


def add_commands(commands: Any, node: Any) -> None:
    """Register the deployment commands (``commands``: the top level; ``node``: `fedtune node`)."""
    certs = commands.add_parser("certs", help="TLS certificates").add_subparsers(
        title="certs commands"
    )
    init = certs.add_parser(
        "init", help="create a CA and the coordinator's TLS certificate signed by it"
    )
    init.add_argument("--out", required=True, type=Path, help="folder for ca.pem, server.pem, ...")
    init.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or IP address nodes use to reach the coordinator; repeat for several "
        "(default: localhost and 127.0.0.1)",
    )
    init.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    init.set_defaults(handler=_certs_init)
    certify = certs.add_parser(
        "certify-node",
        help="(the CA holder) certify a node's enrollment.json: its name and public keys",
    )
    certify.add_argument("enrollment", type=Path, help="the node's enrollment.json")
    certify.add_argument("--name", required=True, help="the node's name (its node.toml's)")
    certify.add_argument(
        "--ca-dir", required=True, type=Path, help="the folder of `certs init` (ca.key)"
    )
    certify.add_argument("--out", required=True, type=Path, help="the certificate (a new file)")
    certify.set_defaults(handler=_certs_certify_node)

    coordinator = commands.add_parser(
        "coordinator", help="the consortium's coordinator (Flower SuperLink)"
    ).add_subparsers(title="coordinator commands")
    start = coordinator.add_parser(
        "start",
        help="run the gateway (nginx, the public address), the SuperLink (127.0.0.1) and its "
        "SuperExec (foreground)",
    )
    start.add_argument("--config", required=True, type=Path, help="coordinator TOML file")
    start.set_defaults(handler=_coordinator_start)
    enroll = coordinator.add_parser("enroll", help="let a node join: register its public keys")
    enroll.add_argument(
        "enrollment", type=Path, help="the node's certified enrollment (`certs certify-node`)"
    )
    enroll.add_argument("--name", required=True, help="the node's name (its node.toml's)")
    enroll.add_argument("--config", required=True, type=Path, help="coordinator TOML file")
    enroll.set_defaults(handler=_coordinator_enroll)
    key = coordinator.add_parser(
        "encryption-key", help="create the key that encrypts global adapter checkpoints at rest"
    )
    key.add_argument("--out", required=True, type=Path, help="a new key file (mode 0600)")
    key.set_defaults(handler=_coordinator_encryption_key)

    run = commands.add_parser("run", help="runs on the deployed nodes").add_subparsers(
        title="run commands"
    )
    run_start = run.add_parser("start", help="submit a training run to the coordinator")
    run_start.add_argument("--config", required=True, type=Path, help="run TOML file")
    run_start.add_argument("--coordinator", required=True, type=Path, help="coordinator TOML")
    run_start.set_defaults(handler=_run_start)
    status = run.add_parser("status", help="runs and their progress (newest first)")
    status.add_argument("run_id", nargs="?", default=None)
    status.add_argument("--coordinator", required=True, type=Path, help="coordinator TOML")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_run_status)
    logs = run.add_parser("logs", help="the coordinator's log of a run")
    logs.add_argument("run_id")
    logs.add_argument("--coordinator", required=True, type=Path, help="coordinator TOML")
    logs.add_argument("--follow", action="store_true", help="stream until the run ends")
    logs.set_defaults(handler=_run_logs)
    resume = run.add_parser("resume", help="continue an interrupted run after its last round")
    resume.add_argument("run_id")
    resume.add_argument("--coordinator", required=True, type=Path, help="coordinator TOML")
    resume.set_defaults(handler=_run_resume)

    keygen = node.add_parser(
        "keygen", help="create the node's keys (SuperNode authentication, ledger signing)"
    )
    keygen.add_argument(
        "--out", required=True, type=Path, help="the node's state folder (node.state_dir)"
    )
    keygen.add_argument(
        "--new-auth-key",
        action="store_true",
        help="rotate: replace the SuperNode key, keep the ledger key; enroll again",
    )
    keygen.set_defaults(handler=_node_keygen)
    node_start = node.add_parser(
        "start", help="join the coordinator: trainer + Flower SuperNode over TLS (foreground)"
    )
    node_start.add_argument("--config", required=True, type=Path, help="node TOML file")
    node_start.set_defaults(handler=_node_start)


def _certs_init(args: argparse.Namespace) -> int:
    from fedtune.platform.security.tls import init_certificates

    paths = init_certificates(
        args.out, hosts=args.host or ("localhost", "127.0.0.1"), days=args.days
    )
    print(f"CA certificate (give it to every node): {paths.ca_cert}")
    print(
        f"CA key (keep it offline: new server certificates, `certs certify-node`): {paths.ca_key}"
    )
    print(f"coordinator certificate and key: {paths.server_cert}, {paths.server_key}")
    return 0


def _certs_certify_node(args: argparse.Namespace) -> int:
    from fedtune.platform.security.enrollment_certificates import certify_enrollment_file
    from fedtune.platform.security.tls import CertificatePaths

    ca_key = CertificatePaths.in_dir(args.ca_dir).ca_key
    node = certify_enrollment_file(args.enrollment, name=args.name, ca_key=ca_key, out=args.out)
    print(f"certified node {node.name}: {args.out} (give it to the coordinator's admin to enroll)")
    return 0


def _coordinator_start(args: argparse.Namespace) -> int:
    from fedtune.coordinator.superlink import CoordinatorSupervisor, prepare
    from fedtune.platform.db.storage import open_database

    os.umask(0o077)  # state, databases, logs: the coordinator's account only
    config = load_coordinator_config(args.config)
    prepare(config)
    open_database(config.database_url).dispose()  # created/migrated before any run
    print(
        f"coordinator: nodes connect to {config.coordinator.host}:{config.coordinator.port} "
        f"(gateway: TLS, Fleet API only, node authentication); database {config.database_url}",
        flush=True,
    )
    supervisor = CoordinatorSupervisor(config, say=partial(print, flush=True))

    def stop(_signum: int, _frame: FrameType | None) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    supervisor.run()
    return 0


def _coordinator_enroll(args: argparse.Namespace) -> int:
    from fedtune.coordinator.enrollment import enroll_node

    config = load_coordinator_config(args.config)
    node_id = enroll_node(config, args.enrollment, name=args.name)
    print(f"enrolled node {args.name} (SuperNode {node_id}); it may now connect")
    return 0


def _coordinator_encryption_key(args: argparse.Namespace) -> int:
    from fedtune.platform.security.encryption import generate_key_file

    path = generate_key_file(args.out)
    print(f"{path}: AES-256 key for checkpoints at rest (mode 0600). Back it up: without it")
    print("the encrypted checkpoints cannot be read. Name it in coordinator.encryption_key_file.")
    return 0


def _run_start(args: argparse.Namespace) -> int:
    from fedtune.coordinator.job import new_run_id
    from fedtune.coordinator.superlink import deployment_job, submit_run

    coordinator = load_coordinator_config(args.coordinator)
    job = deployment_job(coordinator, load_run_config(args.config), run_id=new_run_id())
    flower_run = submit_run(coordinator, job)
    print(f"started run {job.run_id} (Flower run {flower_run})")
    print(f"follow it: fedtune run logs {job.run_id} --coordinator {args.coordinator} --follow")
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_registry import stored_run_config
    from fedtune.coordinator.superlink import deployment_job, submit_run

    coordinator = load_coordinator_config(args.coordinator)
    run = stored_run_config(coordinator, args.run_id)
    job = deployment_job(coordinator, run, run_id=args.run_id, resume=True)
    flower_run = submit_run(coordinator, job)
    print(f"resuming run {args.run_id} (Flower run {flower_run})")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_registry import run_statuses

    coordinator = load_coordinator_config(args.coordinator)
    statuses = run_statuses(coordinator, run_id=args.run_id)
    if args.json:
        print(json.dumps(statuses, indent=2, default=str))
        return 0
    if not statuses:
        print("no runs yet")
    for status in statuses:
        print(
            f"{status['run_id']}  {status['status']:<9} round {status['rounds_done']}/"
            f"{status['rounds_planned']}  started {status['started_at']}"
            + (f"  error: {status['error']}" if status["error"] else "")
        )
    return 0


def _run_logs(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_registry import flower_run_id
    from fedtune.coordinator.superlink import CONNECTION, flower_environment, flwr
    from fedtune.platform.runtime.flower_tools import flower_command

    coordinator = load_coordinator_config(args.coordinator)
    flower_id = flower_run_id(coordinator, args.run_id)
    if args.follow:  # Flower streams to this terminal until the run ends
        return subprocess.call(
            [flower_command("flwr"), "log", flower_id, CONNECTION, "--stream"],
            env=flower_environment(coordinator),
        )
    print(flwr(coordinator, "log", flower_id, CONNECTION, "--show"), end="")
    return 0


def _node_keygen(args: argparse.Namespace) -> int:
    from fedtune.common.keyfiles import KeyFileError
    from fedtune.coordinator.enrollment import ENROLLMENT_FILE, Enrollment, write_enrollment
    from fedtune.platform.security.node_auth import (
        AUTH_KEY_FILE,
        AUTH_PUBLIC_KEY_FILE,
        generate_node_auth_key,
    )
    from fedtune.privacy.signing import KEY_FILE, NodeKey

    ledger_key = args.out / KEY_FILE
    if args.new_auth_key:
        if not ledger_key.exists():
            raise KeyFileError(f"{ledger_key} is missing: run keygen without --new-auth-key")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for name in (AUTH_KEY_FILE, AUTH_PUBLIC_KEY_FILE):
            old = args.out / name
            if old.exists():
                old.rename(old.with_name(f"{name}.replaced-{stamp}"))
    elif ledger_key.exists() or (args.out / ENROLLMENT_FILE).exists():
        raise AlreadyExistsError(
            f"{args.out} already holds a node's keys; they are not overwritten "
            "(--new-auth-key replaces the connection key and keeps the ledger key)"
        )
    auth = generate_node_auth_key(args.out)
    # The ledger key is never replaced: the node's whole ledger is signed with it.
    signing = NodeKey.load_or_create(ledger_key)
    write_enrollment(
        args.out / ENROLLMENT_FILE,
        Enrollment(
            auth_public_key=auth.public_key.read_text().strip(),
            ledger_public_key=signing.public_key_text(),
        ),
    )
    print(f"SuperNode authentication key (ECDSA P-384): {auth.private_key}")
    print(f"ledger signing key (Ed25519): {ledger_key}")
    print(
        f"give {args.out / ENROLLMENT_FILE} (public keys only) to the consortium's CA holder to "
        "certify (`fedtune certs certify-node`), then the certificate to the coordinator's admin"
    )
    print(f"in node.toml: node.state_dir = this folder, coordinator.auth_key = {auth.private_key}")
    return 0


def _node_start(args: argparse.Namespace) -> int:
    from fedtune.client_node.supernode import start_node

    return start_node(args.config)
