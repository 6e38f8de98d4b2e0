"""`fedtune audit`: export, verify and report on a node's epsilon ledger; list what leaves a
node (the egress manifest); audit a node's training empirically with canaries."""

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
    _register_canaries(audit)


def _register_canaries(audit: Any) -> None:
    canaries = audit.add_parser(
        "canaries",
        help="empirical privacy audit: plant random secrets in a copy of the node's data, "
        "train with the node's DP settings and without, measure exposure and a lower bound "
        "on epsilon (never touches the node's ledger or budget)",
    )
    config_option(canaries, "node")
    canaries.add_argument(
        "--out", required=True, type=Path, help="a folder for canary_audit.json and .html"
    )
    canaries.add_argument("--secrets", type=int, default=4, help="k secrets for exposure")
    canaries.add_argument("--repeats", type=int, default=8, help="copies of each secret")
    canaries.add_argument(
        "--membership",
        type=int,
        default=64,
        help="m membership canaries, each planted with probability 1/2 (the epsilon bound)",
    )
    canaries.add_argument(
        "--candidates", type=int, default=127, help="random candidates per secret (its rank)"
    )
    canaries.add_argument("--digits", type=int, default=6, help="digits of a secret")
    canaries.add_argument(
        "--steps", type=int, default=None, help="steps of each training (default: the plan's)"
    )
    canaries.add_argument("--confidence", type=float, default=0.95)
    canaries.add_argument("--seed", type=int, default=None, help="seed for the canaries")
    canaries.add_argument("--no-progress", action="store_true", help="hide progress")
    canaries.set_defaults(handler=_audit_canaries)


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


def _audit_canaries(args: argparse.Namespace) -> int:
    import json

    from fedtune.client_node.canary_audit import CanaryOptions, run_canary_audit
    from fedtune.common.errors import AlreadyExistsError
    from fedtune.platform.config import load_node_config
    from fedtune.privacy.audit.canary_report import render_canary_report
    from fedtune.privacy.audit.report import write_report

    options = CanaryOptions(
        secrets=args.secrets,
        repeats=args.repeats,
        membership=args.membership,
        candidates=args.candidates,
        digits=args.digits,
        confidence=args.confidence,
        steps=args.steps,
        seed=args.seed,
    )
    config = load_node_config(args.config)
    json_path, html_path = args.out / "canary_audit.json", args.out / "canary_audit.html"
    for path in (json_path, html_path):
        if path.exists():
            raise AlreadyExistsError(f"{path} already exists; it is not overwritten")
    result = run_canary_audit(config, options=options, progress=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(json_path, json.dumps(result, indent=2) + "\n")
    write_report(html_path, render_canary_report(result))
    verdict = result["verdict"]
    print(f"{html_path}: epsilon {verdict['epsilon']:.3f} accounted for the DP training")
    for run in result["runs"]:
        print(
            f"  {run['mode']}: epsilon lower bound {run['membership']['epsilon_lower_bound']:.3f}"
            f" ({options.confidence:.0%}), mean exposure {run['exposure_extrapolated_mean']:.1f}"
            f" bits (sampled {run['exposure_sampled_mean']:.1f} of at most "
            f"{run['exposure_sampled_max_possible']:.1f})"
        )
    if not verdict["lower_bound_within_epsilon"]:
        print("  FAILED: the measured lower bound exceeds the accounted epsilon")
        return 1
    return 0
