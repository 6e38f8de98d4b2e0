"""`fedtune certs`: the consortium's CA, TLS certificates and enrollment certificates."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
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
