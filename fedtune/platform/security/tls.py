"""TLS certificates for the coordinator: a private CA and the server certificate it signs.

``init_certificates`` writes four PEM files into one directory:

- ``ca.pem``: the consortium's self-signed CA certificate. Every node gets a copy and trusts
  only it (the SuperNode's ``--root-certificates``).
- ``ca.key``: the CA's private key (mode 0600). The coordinator does not need it at run time;
  it only signs new server certificates, so keep it offline.
- ``server.pem``, ``server.key`` (mode 0600): the coordinator's certificate, valid for every
  given host name and IP address, and its key. Flower's SuperLink takes
  ``--ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key``.

Keys are ECDSA P-384 in unencrypted PKCS#8 PEM, which gRPC (BoringSSL) and Python's ``ssl``
(OpenSSL, uvicorn's HTTPS) both load; certificates are signed with SHA-384. The default
validity, 825 days, is the longest that macOS and iOS accept for a server certificate.

``check_certificates`` lists, in plain words, what would stop a node from connecting, so that
``fedtune coordinator start`` can say so before it starts the SuperLink.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.errors import AlreadyExistsError
from fedtune.common.keyfiles import write_new_file

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"

_CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_NAME = re.compile(
    r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$"
)


@dataclass(frozen=True)
class CertificatePaths:
    """Where the CA and the coordinator's server certificate and keys are."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertificatePaths:
        """The standard file names (``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``)."""
        directory = Path(directory)
        return cls(
            ca_cert=directory / CA_CERT_FILE,
            ca_key=directory / CA_KEY_FILE,
            server_cert=directory / SERVER_CERT_FILE,
            server_key=directory / SERVER_KEY_FILE,
        )


# The SuperLink listens on 127.0.0.1; Flower's tools dial the address, nginx the name.
SUPERLINK_HOSTS = ("127.0.0.1", "localhost")


def init_certificates(
    out_dir: Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 825,
) -> CertificatePaths:
    """Create a CA and a server certificate for ``hosts`` signed by it, in ``out_dir``.

    ``hosts`` are the names and IP addresses nodes use to reach the coordinator; each becomes
    a SubjectAlternativeName (IP addresses as IPAddress, names as DNSName), and so do
    127.0.0.1 and localhost always: the SuperLink behind the gateway serves the same
    certificate on 127.0.0.1, where Flower's SuperExec and CLI dial it by address and the
    gateway (nginx checks DNS names only) by the name localhost. Raises
    ``FileExistsError`` naming the file when any of the four files exists (nothing is
    written then), and ``ValueError`` for an empty host list, a malformed host or
    ``days < 1``.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    names = _parse_hosts(hosts)
    names += [name for name in _parse_hosts(SUPERLINK_HOSTS) if name not in names]
    paths = CertificatePaths.in_dir(out_dir)
    for path in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):
        if path.exists():
            raise AlreadyExistsError(f"{path} already exists; refusing to overwrite it")

    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - _CLOCK_SKEW, now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune consortium CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune coordinator")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_new_file(paths.ca_key, _private_pem(ca_key), mode=0o600)
    write_new_file(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    write_new_file(paths.server_key, _private_pem(server_key), mode=0o600)
    write_new_file(
        paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644
    )
    return paths


def check_certificates(
    paths: CertificatePaths,
    *,
    hosts: Sequence[str] = (),
    at: dt.datetime | None = None,
) -> list[str]:
    """What is wrong with the coordinator's TLS files, one plain sentence each; [] if nothing.

    Checks the files the coordinator serves with (``ca_cert``, ``server_cert``,
    ``server_key``; not ``ca_key``, which belongs offline): that each exists and parses, that
    both certificates are valid at ``at`` (default: now), that the CA certificate is a CA and
    signed the server certificate, that the server key matches the server certificate and is
    not readable by other users, that the certificate is for TLS servers, and that it names
    every one of ``hosts``.
    """
    at = at or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    ca_cert = _load_certificate(paths.ca_cert, problems)
    server_cert = _load_certificate(paths.server_cert, problems)
    server_key = _load_private_key(paths.server_key, problems)

    if ca_cert is not None:
        problems += _validity_problems(ca_cert, paths.ca_cert, at)
        if not _is_ca(ca_cert):
            problems.append(f"{paths.ca_cert} is not a CA certificate (BasicConstraints ca=False)")
    if server_cert is not None:
        problems += _validity_problems(server_cert, paths.server_cert, at)
        if not _has_server_auth(server_cert):
            problems.append(
                f"{paths.server_cert} is not for TLS servers (no serverAuth extended key usage)"
            )
        problems += _host_problems(server_cert, paths.server_cert, hosts)
        if ca_cert is not None and not _issued_by(server_cert, ca_cert):
            problems.append(f"{paths.server_cert} is not signed by the CA in {paths.ca_cert}")
        if server_key is not None and not _same_public_key(server_cert, server_key):
            problems.append(
                f"{paths.server_key} is not the private key of the certificate {paths.server_cert}"
            )
    if server_key is not None:
        mode = stat.S_IMODE(paths.server_key.stat().st_mode)
        if mode & 0o077:
            problems.append(
                f"{paths.server_key} is accessible by other users (mode {mode:04o}); "
                f"run: chmod 600 {paths.server_key}"
            )
    return problems


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        hosts = [hosts]
    if not hosts:
        raise ValueError("give at least one host name or IP address for the certificate")
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _DNS_NAME.match(host) or len(host) > 253:
            raise ValueError(
                f"{host!r} is neither a host name nor an IP address (give no scheme or port)"
            )
        names.append(x509.DNSName(host.lower()))
    return names


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _read(path: Path, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{path} is missing")
    except OSError as error:
        problems.append(f"{path} cannot be read ({error.strerror})")
    return None


def _load_certificate(path: Path, problems: list[str]) -> x509.Certificate | None:
    data = _read(path, problems)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append(f"{path} is not a PEM certificate")
        return None


def _load_private_key(path: Path, problems: list[str]) -> PrivateKeyTypes | None:
    data = _read(path, problems)
    if data is None:
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        problems.append(f"{path} is not an unencrypted PEM private key")
        return None


def _validity_problems(cert: x509.Certificate, path: Path, at: dt.datetime) -> list[str]:
    if at < cert.not_valid_before_utc:
        return [f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"]
    if at > cert.not_valid_after_utc:
        return [f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"]
    return []


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _has_server_auth(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no restriction: any purpose
    return ExtendedKeyUsageOID.SERVER_AUTH in usage


def _host_problems(cert: x509.Certificate, path: Path, hosts: Sequence[str]) -> list[str]:
    if isinstance(hosts, str):
        hosts = [hosts]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    addresses = san.get_values_for_type(x509.IPAddress)
    dns_names = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    listed = ", ".join([*dns_names, *map(str, addresses)]) or "none"
    problems = []
    for host in hosts:
        try:
            covered = ipaddress.ip_address(host) in addresses
        except ValueError:
            covered = any(_dns_matches(pattern, host.lower()) for pattern in dns_names)
        if not covered:
            problems.append(
                f"{path} is not valid for host {host!r} (it names: {listed}); "
                f"make new certificates that include it"
            )
    return problems


def _dns_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return pattern == host


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_public_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
