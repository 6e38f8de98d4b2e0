"""Enrolling a node: its SuperNode authentication key goes to the SuperLink (only enrolled
keys may connect), its ledger key to fedtune's database (only entries it signed are accepted).

A node operator runs `fedtune node keygen --out DIR` and hands the admin ``DIR/enrollment.json``
(public keys only); the admin runs `fedtune coordinator enroll DIR/enrollment.json --name N`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedtune.coordinator.superlink import CONNECTION, CoordinatorError, flwr
from fedtune.platform.config import CoordinatorConfig
from fedtune.platform.ledger_store import add_public_key
from fedtune.platform.node_auth import load_node_auth_public_key
from fedtune.platform.signing import KeyFileError, load_public_key, public_key_text
from fedtune.platform.storage import open_database, transaction

ENROLLMENT_FILE = "enrollment.json"


@dataclass(frozen=True)
class Enrollment:
    auth_public_key: str  # OpenSSH ecdsa-sha2-nistp384 line
    ledger_public_key: str  # base64 Ed25519


def write_enrollment(path: Path, enrollment: Enrollment) -> None:
    path.write_text(
        json.dumps(
            {
                "auth_public_key": enrollment.auth_public_key,
                "ledger_public_key": enrollment.ledger_public_key,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


def read_enrollment(path: Path) -> Enrollment:
    """A node's public keys, validated; KeyFileError names the file and the problem."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        auth, ledger = raw["auth_public_key"], raw["ledger_public_key"]
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise KeyFileError(
            f"{path}: not an enrollment file from `fedtune node keygen` ({exc})"
        ) from None
    return Enrollment(
        auth_public_key=load_node_auth_public_key(str(auth)),
        ledger_public_key=public_key_text(load_public_key(str(ledger))),
    )


def enroll_node(config: CoordinatorConfig, path: Path, *, name: str) -> str:
    """Register the node's keys under ``name``; returns the SuperLink's node id. Enrolling a
    name again with a new connection key (a rotation) unregisters its previous one; its
    ledger keys are all kept, so its earlier entries still verify."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CoordinatorError(f"node name {name!r}: use letters, digits, '_', '.', '-'")
    enrollment = read_enrollment(path)
    folder = config.coordinator.state_dir / "enrolled"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{name}.json"
    previous = json.loads(record.read_text(encoding="utf-8")) if record.exists() else None
    if previous is not None and previous["auth_public_key"] == enrollment.auth_public_key:
        node_id = str(previous["node_id"])  # already registered with this key
    else:
        auth_file = folder / f"{name}.pub"
        auth_file.write_text(enrollment.auth_public_key + "\n", encoding="utf-8")
        output = flwr(config, "supernode", "register", str(auth_file), CONNECTION, "--name", name)
        found = re.search(r"SuperNode (\d+)", output)
        if found is None:
            raise CoordinatorError(f"flwr supernode register answered: {output.strip()[-300:]}")
        node_id = found.group(1)
        if previous is not None:
            flwr(config, "supernode", "unregister", str(previous["node_id"]), CONNECTION)
        record.write_text(
            json.dumps({"node_id": node_id, "auth_public_key": enrollment.auth_public_key}),
            encoding="utf-8",
        )
    with transaction(open_database(config.database_url)) as session:
        add_public_key(session, name, enrollment.ledger_public_key)
    return node_id
