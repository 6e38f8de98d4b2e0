"""`fedtune coordinator`: the consortium's coordinator (gateway, SuperLink, enrollment)."""

from __future__ import annotations

import argparse
import os
import signal
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from fedtune.cli.options import config_option
from fedtune.platform.config import (
    load_coordinator_config,
)


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    coordinator = commands.add_parser(
        "coordinator", help="the consortium's coordinator (Flower SuperLink)"
    ).add_subparsers(title="coordinator commands")
    start = coordinator.add_parser(
        "start",
        help="run the gateway (nginx, the public address), the SuperLink (127.0.0.1) and its "
        "SuperExec (foreground)",
    )
    config_option(start, "coordinator")
    start.set_defaults(handler=_coordinator_start)
    enroll = coordinator.add_parser("enroll", help="let a node join: register its public keys")
    enroll.add_argument(
        "enrollment", type=Path, help="the node's certified enrollment (`certs certify-node`)"
    )
    enroll.add_argument("--name", required=True, help="the node's name (its node.toml's)")
    config_option(enroll, "coordinator")
    enroll.set_defaults(handler=_coordinator_enroll)
    key = coordinator.add_parser(
        "encryption-key", help="create the key that encrypts global adapter checkpoints at rest"
    )
    key.add_argument("--out", required=True, type=Path, help="a new key file (mode 0600)")
    key.set_defaults(handler=_coordinator_encryption_key)
    witness = coordinator.add_parser(
        "witness-key",
        help="print the public key with which the coordinator countersigns nodes' ledger heads "
        "(auditors pass it to `fedtune audit verify --witness-key`)",
    )
    config_option(witness, "coordinator")
    witness.set_defaults(handler=_coordinator_witness_key)


def _coordinator_start(args: argparse.Namespace) -> int:
    from fedtune.coordinator.superlink import CoordinatorSupervisor, prepare
    from fedtune.platform.db.storage import open_database
    from fedtune.privacy.signing import NodeKey

    os.umask(0o077)  # state, databases, logs: the coordinator's account only
    config = load_coordinator_config(args.config)
    prepare(config)
    open_database(config.database_url).dispose()  # created/migrated before any run
    witness = NodeKey.load_or_create(config.witness_key_path)
    print(
        f"coordinator: nodes connect to {config.coordinator.host}:{config.coordinator.port} "
        f"(gateway: TLS, Fleet API only, node authentication); database {config.database_url}",
        flush=True,
    )
    print(f"coordinator: ledger receipts signed with witness key {witness.public_key_text()}")
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


def _coordinator_witness_key(args: argparse.Namespace) -> int:
    from fedtune.privacy.signing import NodeKey

    config = load_coordinator_config(args.config)
    os.umask(0o077)
    print(NodeKey.load_or_create(config.witness_key_path).public_key_text())
    return 0


def _coordinator_encryption_key(args: argparse.Namespace) -> int:
    from fedtune.platform.security.encryption import generate_key_file

    path = generate_key_file(args.out)
    print(f"{path}: AES-256 key for checkpoints at rest (mode 0600). Back it up: without it")
    print("the encrypted checkpoints cannot be read. Name it in coordinator.encryption_key_file.")
    return 0
