"""The coordinator's CA and server certificate: real TLS handshakes on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedtune.platform.security.tls import CertificatePaths, check_certificates, init_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    return init_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    return init_certificates(tmp_path_factory.mktemp("other-certs"))


@pytest.fixture
def tls_server(certs: CertificatePaths) -> Iterator[int]:
    """A TLS server on 127.0.0.1 serving server.pem/server.key; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(5)
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError):
                connection.close()  # the client refused the certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    listener.close()


def _connect(port: int, *, cafile: Path, hostname: str) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; RFC 5280 checks
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        return tls.recv(5)


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_client_trusting_only_the_ca_accepts_the_server(
    tls_server: int, certs: CertificatePaths, hostname: str
) -> None:
    assert _connect(tls_server, cafile=certs.ca_cert, hostname=hostname) == b"hello"


def test_client_trusting_another_ca_refuses_the_server(
    tls_server: int, other_certs: CertificatePaths
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _connect(tls_server, cafile=other_certs.ca_cert, hostname="127.0.0.1")


def test_client_refuses_a_host_name_the_certificate_does_not_name(
    tls_server: int, certs: CertificatePaths
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _connect(tls_server, cafile=certs.ca_cert, hostname="coordinator.example.org")


def test_flower_grpc_server_serves_with_the_certificates(certs: CertificatePaths) -> None:
    from flwr.supercore.grpc import create_channel, generic_create_grpc_server

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, _: request)}
    )
    server = generic_create_grpc_server(
        (handler, lambda h, s: s.add_generic_rpc_handlers((h,))),
        "127.0.0.1:0",
        max_concurrent_workers=2,
        certificates=(
            certs.ca_cert.read_bytes(),
            certs.server_cert.read_bytes(),
            certs.server_key.read_bytes(),
        ),
    )
    server.start()
    try:
        port = server.bound_address.rpartition(":")[2]
        for host in ("127.0.0.1", "localhost"):
            channel = create_channel(
                f"{host}:{port}", insecure=False, root_certificates=certs.ca_cert.read_bytes()
            )
            with channel:
                echo = channel.unary_unary("/test.Echo/Echo")
                assert echo(b"ping", timeout=10) == b"ping"
    finally:
        server.stop(grace=None).wait()


def test_certificates_have_the_required_extensions(certs: CertificatePaths) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in (
        server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    public_key = server.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp384r1"


def test_every_host_becomes_a_subject_alternative_name_beside_the_superlink_s(
    tmp_path: Path,
) -> None:
    paths = init_certificates(
        tmp_path, hosts=["coordinator.example.org", "10.0.0.5", "::1"], days=30
    )

    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # localhost and 127.0.0.1: where the gateway and Flower's tools reach the SuperLink
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert server.not_valid_after_utc - server.not_valid_before_utc < dt.timedelta(days=31)


def test_private_keys_are_readable_by_their_owner_only(certs: CertificatePaths) -> None:
    assert stat.S_IMODE(certs.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.ca_cert.stat().st_mode) == 0o644


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("mine")

    with pytest.raises(FileExistsError, match=r"server\.key already exists"):
        init_certificates(tmp_path)

    assert (tmp_path / "server.key").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


@pytest.mark.parametrize("host", ["https://coordinator", "coordinator:9092", "two words", ""])
def test_malformed_host_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="neither a host name nor an IP address"):
        init_certificates(tmp_path, hosts=[host])
    assert not any(tmp_path.iterdir())


def test_check_finds_nothing_wrong_with_fresh_certificates(certs: CertificatePaths) -> None:
    assert check_certificates(certs, hosts=["localhost", "127.0.0.1"]) == []


def test_check_reports_a_missing_file(tmp_path: Path, certs: CertificatePaths) -> None:
    paths = CertificatePaths(
        ca_cert=tmp_path / "ca.pem",
        ca_key=certs.ca_key,
        server_cert=certs.server_cert,
        server_key=certs.server_key,
    )

    problems = check_certificates(paths)

    assert problems == [f"{tmp_path / 'ca.pem'} is missing"]


def test_check_reports_expired_certificates(certs: CertificatePaths) -> None:
    problems = check_certificates(certs, at=dt.datetime.now(dt.UTC) + dt.timedelta(days=900))

    assert len(problems) == 2
    assert all(" expired on " in problem for problem in problems)


def test_check_reports_a_server_certificate_of_another_ca(
    certs: CertificatePaths, other_certs: CertificatePaths
) -> None:
    mixed = CertificatePaths(
        ca_cert=other_certs.ca_cert,
        ca_key=other_certs.ca_key,
        server_cert=certs.server_cert,
        server_key=certs.server_key,
    )

    assert check_certificates(mixed) == [
        f"{certs.server_cert} is not signed by the CA in {other_certs.ca_cert}"
    ]


def test_check_reports_a_host_the_certificate_does_not_name(certs: CertificatePaths) -> None:
    problems = check_certificates(certs, hosts=["127.0.0.1", "coordinator.example.org"])

    assert len(problems) == 1
    assert "not valid for host 'coordinator.example.org'" in problems[0]
    assert "localhost, 127.0.0.1" in problems[0]


def test_check_reports_a_key_that_does_not_match_the_certificate(
    certs: CertificatePaths, other_certs: CertificatePaths
) -> None:
    mixed = CertificatePaths(
        ca_cert=certs.ca_cert,
        ca_key=certs.ca_key,
        server_cert=certs.server_cert,
        server_key=other_certs.server_key,
    )

    assert check_certificates(mixed) == [
        f"{other_certs.server_key} is not the private key of the certificate {certs.server_cert}"
    ]


def test_check_reports_a_server_key_readable_by_others(
    tmp_path: Path, certs: CertificatePaths
) -> None:
    for path in (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key):
        shutil.copy(path, tmp_path / path.name)
    paths = CertificatePaths.in_dir(tmp_path)
    os.chmod(paths.server_key, 0o644)

    problems = check_certificates(paths)

    assert problems == [
        f"{paths.server_key} is accessible by other users (mode 0644); "
        f"run: chmod 600 {paths.server_key}"
    ]
