"""Enrolling a node: its SuperNode authentication key goes to the SuperLink (only registered
keys may connect), its name, that key and its SuperNode id to the roster in fedtune's database
(only enrolled nodes take part in runs, under those names: :mod:`fedtune.coordinator.roster`),
its ledger key to the database too (only entries it signed are accepted).

A node operator runs `fedtune node keygen --out DIR` and hands ``DIR/enrollment.json`` (public
keys only) to the consortium's CA holder, who certifies it (`fedtune certs certify-node`, on the
machine that keeps the CA key, not the coordinator); the admin enrolls the certificate:
`fedtune coordinator enroll N.certified.json --name N`. The certificate goes to the roster too:
the ServerApp relays it to the node's peers, who check the node's signed SecAgg+ keys against
it (:mod:`fedtune.platform.security.enrollment_certificates`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.database import transaction
from fedtune.common.errors import unreadable
from fedtune.common.keyfiles import KeyFileError
from fedtune.coordinator.roster import (
    enrolled_name_of_key,
    enrolled_node,
    flower_public_key,
    record_enrollment,
)
from fedtune.coordinator.superlink import CONNECTION, CoordinatorError, flwr
from fedtune.platform.config import CoordinatorConfig
from fedtune.platform.db.storage import open_database
from fedtune.platform.security.enrollment_certificates import (
    EnrollmentCertificateError,
    is_certificate,
    load_ca_certificate,
    verify_certificate,
)
from fedtune.platform.security.node_auth import node_auth_public_key_from_text
from fedtune.privacy.ledger_store import add_public_key

ENROLLMENT_FILE = "enrollment.json"
LIVE_STATUSES = ("registered", "online", "offline")  # `flwr supernode list`; else "unregistered"


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


def read_certified_enrollment(
    path: Path, ca_certificate: Path, *, name: str
) -> tuple[Enrollment, str]:
    """A node's public keys from its enrollment certificate, and the certificate's text.

    Refuses (``KeyFileError``) a plain enrollment.json, a certificate the consortium's CA
    (``ca_certificate``) did not sign, and one for another name."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"enrollment certificate {unreadable(path, exc)}") from None
    if not is_certificate(data):
        raise KeyFileError(
            f"{path} is not certified: the holder of the consortium's CA key certifies it "
            f"first (`fedtune certs certify-node {path.name} --name {name} --ca-dir CA_DIR "
            "--out FILE`), then enroll FILE"
        )
    try:
        node = verify_certificate(data, load_ca_certificate(ca_certificate))
    except EnrollmentCertificateError as error:
        raise KeyFileError(f"{path}: {error}") from None
    if node.name != name:
        raise KeyFileError(f"{path} certifies node {node.name!r}, not {name!r}")
    enrollment = Enrollment(
        auth_public_key=node_auth_public_key_from_text(
            node.auth_public_key, source=f"{path}: auth_public_key"
        ),
        ledger_public_key=node.ledger_public_key,
    )
    return enrollment, data.decode("utf-8")


def enroll_node(config: CoordinatorConfig, path: Path, *, name: str) -> str:
    """Register the node's keys under ``name``; returns the SuperLink's node id.

    Idempotent against the SuperLink's real state (`flwr supernode list`), not against a file:
    the key is registered unless the roster's SuperNode for ``name`` holds it and the SuperLink
    still lists it. Enrolling a name again with a new connection key (a rotation)
    unregisters its previous one; its ledger keys are all kept, so its earlier entries still
    verify. The roster row (name, key, node id) is what the ServerApp trusts."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CoordinatorError(f"node name {name!r}: use letters, digits, '_', '.', '-'")
    enrollment, certificate = read_certified_enrollment(path, config.tls.ca_certificate, name=name)
    key = flower_public_key(enrollment.auth_public_key)
    engine = open_database(config.database_url)
    with transaction(engine) as session:
        row = enrolled_node(session, name)
        previous = (row.auth_public_key, row.flower_node_id) if row else _legacy(config, name)
        holder = enrolled_name_of_key(session, key)
    if holder not in (None, name):
        raise CoordinatorError(f"this SuperNode key is enrolled as node {holder!r} already")
    listed = superlink_nodes(config)
    old_key, old_id = previous or (None, None)
    old_live = old_id is not None and listed.get(old_id) in LIVE_STATUSES
    if old_key == key and old_live:
        node_id = str(old_id)  # registered with this key already
    else:
        unregistered = old_key == key and listed.get(str(old_id)) == "unregistered"
        node_id = _register(config, name, enrollment.auth_public_key, unregistered=unregistered)
    with transaction(engine) as session:
        record_enrollment(session, name, public_key=key, node_id=node_id, certificate=certificate)
        add_public_key(session, name, enrollment.ledger_public_key)
    if old_live and old_id != node_id:
        try:
            flwr(config, "supernode", "unregister", str(old_id), CONNECTION)
        except CoordinatorError as exc:
            raise CoordinatorError(
                f"enrolled {name}'s new key as SuperNode {node_id}, but its old SuperNode "
                f"{old_id} is still registered ({exc}); unregister it: `flwr supernode "
                f"unregister {old_id}`"
            ) from None
    return node_id


def superlink_nodes(config: CoordinatorConfig) -> dict[str, str]:
    """Every SuperNode the SuperLink knows (unregistered ones too) -> its status."""
    answer = _json_answer(flwr(config, "supernode", "list", CONNECTION, "--format", "json"))
    return {str(node["node-id"]): str(node["status"]) for node in answer.get("nodes", [])}


def _register(config: CoordinatorConfig, name: str, auth_key: str, *, unregistered: bool) -> str:
    folder = config.coordinator.state_dir / "enrolled"
    folder.mkdir(parents=True, exist_ok=True)
    auth_file = folder / f"{name}.pub"  # for Flower's CLI, which reads a file
    auth_file.write_text(auth_key + "\n", encoding="utf-8")
    try:
        answer = _json_answer(
            flwr(
                config,
                "supernode",
                "register",
                str(auth_file),
                CONNECTION,
                "--name",
                name,
                "--format",
                "json",
            )
        )
    except CoordinatorError as exc:
        if "already in use" not in str(exc):
            raise
        if unregistered:
            raise CoordinatorError(
                f"the SuperLink has unregistered node {name}'s key, and Flower never registers "
                "a key twice: the node makes a new one (`fedtune node keygen --out DIR "
                "--new-auth-key`), then enroll its enrollment.json again"
            ) from None
        raise CoordinatorError(
            f"node {name}'s key is registered with the SuperLink already, not by fedtune's "
            "enrollment (`flwr supernode list`): unregister that SuperNode, or let the node "
            "make a new key (`fedtune node keygen --out DIR --new-auth-key`)"
        ) from None
    return str(answer["node-id"])


def _json_answer(output: str) -> dict[str, Any]:
    """The JSON a `flwr ... --format json` command printed; CoordinatorError if it failed."""
    try:
        answer = json.loads(output)
    except json.JSONDecodeError:
        raise CoordinatorError(f"flwr answered: {output.strip()[-300:]}") from None
    if not isinstance(answer, dict) or not answer.get("success"):
        detail = str(answer.get("error-message", answer) if isinstance(answer, dict) else answer)
        raise CoordinatorError("flwr: " + detail.strip().splitlines()[-1])
    return answer


def _legacy(config: CoordinatorConfig, name: str) -> tuple[str, str] | None:
    """(key, node id) from ``STATE/enrolled/NAME.json``, which enrollment wrote before the
    roster was in the database: a node enrolled then keeps its SuperNode (the SuperLink is
    still asked whether it holds it)."""
    record = config.coordinator.state_dir / "enrolled" / f"{name}.json"
    try:
        raw = json.loads(record.read_text(encoding="utf-8"))
        return flower_public_key(str(raw["auth_public_key"])), str(raw["node_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
