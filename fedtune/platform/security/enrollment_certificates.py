"""Enrollment certificates: the consortium's CA vouches for who a node is, so that the nodes
need not take the coordinator's word for it.

SecAgg+ public keys travel through the coordinator. Unsigned, a malicious coordinator can put
its own keys in place of a node's (or invent nodes) and strip the masks. So each node signs
its SecAgg+ public keys with its enrolled Ed25519 ledger key, and every peer checks that
signature against an enrollment certificate: the node's name and public keys, signed by the
consortium's CA key (the one behind ``ca.pem``, which every node already trusts for TLS, and
which the guide tells the consortium to keep offline, away from the coordinator). The
coordinator relays certificates and signatures; it can drop them, which stops the round, but
not forge them.

Formats (all JSON canonicalised with RFC 8785 before signing):

- certificate: ``{"format": CERTIFICATE_FORMAT, "name", "auth_public_key" (OpenSSH line),
  "ledger_public_key" (base64 Ed25519), "certified_at" (UTC ISO 8601), "ca_signature"}``;
  ``ca_signature`` is base64 DER ECDSA-SHA384 by the CA key over the other fields.
- SecAgg+ key statement: ``{"purpose": KEY_STATEMENT_PURPOSE, "run_id", "round" (the
  message group id), "node_id" (both ids as decimal text), "pk1", "pk2" (base64)}``, signed
  with the node's Ed25519 key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.common.errors import AlreadyExistsError, FedtuneError, unreadable
from fedtune.platform.security.node_auth import node_auth_public_key_from_text
from fedtune.privacy.signing import (
    NodeKey,
    public_key_from_text,
    public_key_text,
    verify_signature,
)

CERTIFICATE_FORMAT = "fedtune-enrollment-certificate/1"
# Records beside Flower's SecAgg+ configs: a node's setup reply carries its signature of its
# keys; a share-keys message, each listed node's [certificate, signature].
KEY_SIGNATURE_RECORD = "fedtune.secagg-key-signature"
PEERS_RECORD = "fedtune.secagg-peers"
KEY_STATEMENT_PURPOSE = "fedtune secagg+ public keys/1"
_FIELDS = ("format", "name", "auth_public_key", "ledger_public_key", "certified_at")
_MAX_CERTIFICATE_BYTES = 16_384
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class EnrollmentCertificateError(FedtuneError, ValueError):
    """An enrollment certificate that is malformed, or not signed by the consortium's CA."""


@dataclass(frozen=True)
class CertifiedNode:
    """What a valid enrollment certificate says."""

    name: str
    auth_public_key: str
    ledger_public_key: str
    certified_at: str

    @property
    def ledger_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.ledger_public_key))


def certify_enrollment(
    *,
    name: str,
    auth_public_key: str,
    ledger_public_key: str,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime | None = None,
) -> bytes:
    """A certificate (JSON bytes) binding ``name`` to the node's two public keys."""
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise EnrollmentCertificateError("the CA key is not an ECDSA private key")
    fields = {
        "format": CERTIFICATE_FORMAT,
        "name": name,
        "auth_public_key": auth_public_key,
        "ledger_public_key": ledger_public_key,
        "certified_at": (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    signature = ca_key.sign(rfc8785.dumps(fields), ec.ECDSA(hashes.SHA384()))
    certificate = {**fields, "ca_signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(certificate, indent=2) + "\n").encode("utf-8")


def certify_enrollment_file(
    enrollment: Path, *, name: str, ca_key: Path, out: Path
) -> CertifiedNode:
    """Certify a node's ``enrollment.json`` (from `fedtune node keygen`) under ``name`` with
    the CA key ``ca_key``; the certificate goes to ``out``, a new file."""
    if not _NAME.fullmatch(name):
        raise EnrollmentCertificateError(f"node name {name!r}: use letters, digits, '_', '.', '-'")
    try:
        raw = json.loads(Path(enrollment).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise EnrollmentCertificateError(
            f"enrollment file {unreadable(enrollment, error)}"
        ) from None
    except json.JSONDecodeError as error:
        raise EnrollmentCertificateError(
            f"{enrollment}: not an enrollment file from `fedtune node keygen` (not JSON: "
            f"{error.msg})"
        ) from None
    fields = ("auth_public_key", "ledger_public_key")
    if not isinstance(raw, dict) or not all(isinstance(raw.get(f), str) for f in fields):
        raise EnrollmentCertificateError(
            f"{enrollment}: not an enrollment file from `fedtune node keygen` (expected an "
            f"object with the strings {' and '.join(fields)})"
        )
    try:  # the values are keys' text, never paths on this machine
        auth = node_auth_public_key_from_text(
            raw["auth_public_key"], source=f"{enrollment}: auth_public_key"
        )
        ledger = public_key_text(
            public_key_from_text(
                raw["ledger_public_key"], source=f"{enrollment}: ledger_public_key"
            )
        )
    except ValueError as error:
        raise EnrollmentCertificateError(str(error)) from None
    certificate = certify_enrollment(
        name=name,
        auth_public_key=auth,
        ledger_public_key=ledger,
        ca_key=load_ca_private_key(ca_key),
    )
    try:
        with open(out, "xb") as file:
            file.write(certificate)
    except FileExistsError:
        raise AlreadyExistsError(f"{out} exists already; choose another --out") from None
    return CertifiedNode(name, auth, ledger, json.loads(certificate)["certified_at"])


def load_ca_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The CA's private key (``ca.key`` from `fedtune certs init`)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise EnrollmentCertificateError(f"{path}: no such file (the CA's key)") from None
    except (OSError, ValueError, TypeError) as error:
        raise EnrollmentCertificateError(f"{path}: not the CA's private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EnrollmentCertificateError(f"{path}: not an ECDSA private key")
    return key


def load_ca_certificate(path: Path) -> x509.Certificate:
    """The consortium's CA certificate (``ca.pem``)."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise EnrollmentCertificateError(f"{path}: no such file (the CA certificate)") from None
    except (OSError, ValueError) as error:
        raise EnrollmentCertificateError(f"{path}: not a PEM certificate ({error})") from None


def is_certificate(data: bytes) -> bool:
    """Whether ``data`` looks like an enrollment certificate (valid or not)."""
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(parsed, dict) and parsed.get("format") == CERTIFICATE_FORMAT


def verify_certificate(data: bytes, ca_certificate: x509.Certificate) -> CertifiedNode:
    """The node a certificate names, if the CA behind ``ca_certificate`` signed it."""
    if len(data) > _MAX_CERTIFICATE_BYTES:
        raise EnrollmentCertificateError("enrollment certificate: too large")
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise EnrollmentCertificateError("enrollment certificate: not JSON") from None
    if not isinstance(parsed, dict) or parsed.get("format") != CERTIFICATE_FORMAT:
        raise EnrollmentCertificateError(
            f"enrollment certificate: not a {CERTIFICATE_FORMAT} document"
        )
    if set(parsed) != {*_FIELDS, "ca_signature"} or not all(
        isinstance(value, str) for value in parsed.values()
    ):
        raise EnrollmentCertificateError(
            "enrollment certificate: fields must be exactly "
            + ", ".join((*_FIELDS, "ca_signature"))
        )
    fields = {key: parsed[key] for key in _FIELDS}
    try:
        signature = base64.b64decode(parsed["ca_signature"], validate=True)
        public_key = ca_certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise EnrollmentCertificateError("the CA certificate does not hold an ECDSA key")
        public_key.verify(signature, rfc8785.dumps(fields), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise EnrollmentCertificateError(
            f"enrollment certificate of {fields['name']!r}: not signed by the consortium's CA"
        ) from None
    try:
        ledger = base64.b64decode(fields["ledger_public_key"], validate=True)
        Ed25519PublicKey.from_public_bytes(ledger)
    except (binascii.Error, ValueError):
        raise EnrollmentCertificateError(
            f"enrollment certificate of {fields['name']!r}: the ledger key is not Ed25519"
        ) from None
    return CertifiedNode(
        name=fields["name"],
        auth_public_key=fields["auth_public_key"],
        ledger_public_key=fields["ledger_public_key"],
        certified_at=fields["certified_at"],
    )


def key_statement(*, run_id: int, group_id: str, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """What a node signs for its SecAgg+ public keys of one round."""
    statement: dict[str, Any] = {
        "purpose": KEY_STATEMENT_PURPOSE,
        "run_id": str(int(run_id)),  # as text: Flower's ids are 64-bit, RFC 8785 numbers 53
        "round": str(group_id),
        "node_id": str(int(node_id)),
        "pk1": base64.b64encode(pk1).decode("ascii"),
        "pk2": base64.b64encode(pk2).decode("ascii"),
    }
    return rfc8785.dumps(statement)


def sign_keys(key: NodeKey, **statement: Any) -> str:
    """``key``'s signature (base64) of :func:`key_statement`'s ``statement``."""
    return key.sign(key_statement(**statement))


def keys_signed_by(node: CertifiedNode, signature: str, **statement: Any) -> bool:
    """Whether ``signature`` is ``node``'s signature of :func:`key_statement`'s
    ``statement``."""
    return verify_signature(
        node.ledger_key, signature=signature, message=key_statement(**statement)
    )
