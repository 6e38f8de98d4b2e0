"""`fedtune audit`: export, verify and report on a node's epsilon ledger; list what leaves a
node (the egress manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedtune.cli.options import config_option


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    audit = commands.add_parser(
        "audit",
        help="export, verify and report on a node's epsilon ledger; list what leaves a node",
    ).add_subparsers(title="audit commands")
    export = audit.add_parser("export", help="write a node's ledger as auditor-facing JSONL")
    export.add_argument(
        "--db",
        required=True,
        help="database URL, or the path of a SQLite file (a node's "
        "STATE_DIR/ledger.db or the coordinator's fedtune.db)",
    )
    export.add_argument("--node", required=True, help="node name")
    export.add_argument("--out", required=True, type=Path, help="a new .jsonl file")
    export.set_defaults(handler=_audit_export)
    verify = audit.add_parser("verify", help="verify an exported ledger (exit 0: it holds)")
    verify.add_argument("ledger", type=Path)
    verify.add_argument(
        "--public-key", required=True, help="the node's public key (PEM file or base64)"
    )
    verify.add_argument(
        "--witness-key",
        help="the coordinator's witness key (PEM file or base64; `fedtune coordinator "
        "witness-key`): the ledger must reach every head the coordinator countersigned",
    )
    verify.add_argument(
        "--coordinator-copy",
        type=Path,
        help="an export of the coordinator's copy of this node's ledger (`fedtune audit export "
        "--db fedtune.db`): the ledger must hold every entry and receipt there, unchanged",
    )
    verify.set_defaults(handler=_audit_verify)
    report = audit.add_parser(
        "report",
        help="an HTML report: epsilon per data set against its cap, every entry, "
        "verification, independent recomputation",
    )
    report.add_argument("ledger", type=Path)
    report.add_argument("--out", required=True, type=Path, help="a new .html file")
    report.add_argument(
        "--public-key", default=None, help="the node's public key (default: the file's own)"
    )
    report.add_argument(
        "--node-config",
        type=Path,
        default=None,
        help="the node's node.toml: the report's egress manifest for its settings "
        "(default: a node's default settings)",
    )
    report.set_defaults(handler=_audit_report)
    egress = audit.add_parser(
        "egress",
        help="what leaves a node: every field of every reply, its type and protection "
        "(masked, DP with its accounting, signed, plain), and what Flower sends beside them",
    )
    config_option(
        egress,
        "node",
        required=False,
        help="the node's node.toml: the manifest for its settings (default: a node's defaults)",
    )
    egress.add_argument("--json", action="store_true", help="print the manifest as JSON")
    egress.set_defaults(handler=_audit_egress)


def _audit_export(args: argparse.Namespace) -> int:
    from fedtune.privacy.ledger_export import export_ledger

    count = export_ledger(args.db, node=args.node, out=args.out)
    print(f"{args.out}: {count} ledger entries of node {args.node}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from fedtune.privacy.ledger_file import format_verification, verify_ledger_file
    from fedtune.privacy.signing import load_public_key

    result = verify_ledger_file(
        args.ledger,
        public_key=load_public_key(args.public_key),
        witness_key=load_public_key(args.witness_key) if args.witness_key else None,
        coordinator_copy=args.coordinator_copy,
    )
    print(format_verification(result))
    return 0 if result.ok else 1


def _audit_report(args: argparse.Namespace) -> int:
    from fedtune.privacy.audit.verify import audit_ledger, write_audit_report

    outcome = audit_ledger(args.ledger, public_key=args.public_key)
    path = write_audit_report(outcome, out=args.out, egress=_manifest(args.node_config).to_dict())
    verdict = "verified" if outcome.verification.ok else f"FAILED: {outcome.verification.problem}"
    checked = [r for r in outcome.recomputations if not r.skipped]
    print(f"{path}: ledger {verdict}")
    print(
        f"  independent recomputation: {len(checked) - len(outcome.disagreements)} of "
        f"{len(checked)} private entries agree"
    )
    return 0 if outcome.ok else 1


def _manifest(config: Path | None) -> Any:
    """The egress manifest of the node ``config`` describes, or of a node's defaults."""
    from fedtune.platform.config import load_node_config
    from fedtune.platform.wire.egress import egress_manifest, node_manifest

    return node_manifest(load_node_config(config)) if config is not None else egress_manifest()


def _audit_egress(args: argparse.Namespace) -> int:
    import json

    from fedtune.platform.wire.egress import format_manifest

    manifest = _manifest(args.config)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print(format_manifest(manifest))
    return 0
