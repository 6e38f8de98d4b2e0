"""The `fedtune` command.

Heavy libraries (torch, transformers, Flower) load only in the handler that needs them, so
`fedtune --help` and the audit commands start fast (the audit's worker processes re-import
this module).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.cli_deployment import add_commands as add_deployment_commands
from fedtune.common.errors import FedtuneError
from fedtune.demo.data import DOMAINS, check_demo_output, write_demo_data
from fedtune.platform.config import ConfigError, load_node_config, load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except FedtuneError as exc:
        return _fail(str(exc))
    except OSError as exc:
        # Backstop: the files a command reads are checked where they are read (a
        # FedtuneError naming the file); an OS refusal elsewhere (a folder without write
        # permission, a full disk) names its path in one line too. One without a path is a bug.
        if exc.filename is None:
            raise
        return _fail(f"{exc.filename}: {exc.strerror or exc}")


def _fail(message: str) -> int:
    """One line on stderr, exit code 2: a multi-line message is joined with '; '."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"fedtune: error: {line}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Federated, differentially private LoRA fine-tuning."
    )
    commands = parser.add_subparsers(title="commands")

    node = commands.add_parser("node", help="what runs at an organisation's node").add_subparsers(
        title="node commands"
    )
    train = node.add_parser("train", help="train one DP-LoRA round on the node's local data")
    train.add_argument("--config", required=True, type=Path, help="node TOML file")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=_node_train)
    key = node.add_parser(
        "key", help="print the node's public signing key (created on first use), to enroll it"
    )
    key.add_argument("--config", required=True, type=Path, help="node TOML file")
    key.set_defaults(handler=_node_key)
    add_deployment_commands(commands, node)

    data = commands.add_parser("data", help="data sets").add_subparsers(title="data commands")
    demo_data = data.add_parser("demo", help="write the synthetic hospital and bank data sets")
    demo_data.add_argument("--out", required=True, type=Path)
    demo_data.add_argument("--domain", choices=[*DOMAINS, "all"], default="all")
    demo_data.add_argument("--train", type=int, default=800, help="training examples")
    demo_data.add_argument("--held-out", type=int, default=100, help="held-out examples")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(handler=_data_demo)

    model = commands.add_parser("model", help="base models").add_subparsers(title="model commands")
    fetch = model.add_parser("fetch", help="fetch/convert a base model and print its fingerprint")
    fetch.add_argument("spec", nargs="?", default="smollm2-135m")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    fetch.set_defaults(handler=_model_fetch)
    listing = model.add_parser("list", help="model versions: base and every global adapter")
    listing.add_argument("--db", required=True, help="coordinator database URL or SQLite file")
    listing.set_defaults(handler=_model_list)
    promote = model.add_parser("promote", help="put a model version in production")
    promote.add_argument("version", help="base, latest, RUN_ID/ROUND or a SHA-256 prefix")
    promote.add_argument("--db", required=True, help="coordinator database URL or SQLite file")
    promote.add_argument("--by", required=True, help="who promotes it (recorded)")
    promote.add_argument("--note", default=None)
    promote.set_defaults(handler=_model_promote)
    export_model = model.add_parser(
        "export", help="write a global adapter as a plain PEFT folder (decrypted if need be)"
    )
    export_model.add_argument("version", help="latest, RUN_ID/ROUND or a SHA-256 prefix")
    export_model.add_argument("--db", required=True, help="coordinator database URL or SQLite file")
    export_model.add_argument("--out", required=True, type=Path, help="a new folder")
    export_model.add_argument(
        "--key", type=Path, default=None, help="the checkpoint key file, if they are encrypted"
    )
    export_model.set_defaults(handler=_model_export)

    demo = commands.add_parser(
        "demo",
        help="two nodes (a hospital and a bank) train the default model together with DP-LoRA",
    )
    demo.add_argument(
        "--workdir", type=Path, default=None, help="a new folder (default: runs/demo-<time>)"
    )
    demo.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    demo.add_argument("--steps", type=int, default=4, help="DP-SGD steps per round (default 4)")
    demo.add_argument("--model", default="smollm2-135m", help="model spec")
    demo.add_argument(
        "--deployment",
        action="store_true",
        help="real processes on 127.0.0.1: a coordinator and two nodes over TLS with node "
        "authentication and secure aggregation",
    )
    demo.set_defaults(handler=_demo)

    sim = commands.add_parser(
        "simulate", help="a federated run with any number of nodes (Flower Simulation Engine)"
    )
    sim.add_argument("--config", required=True, type=Path, help="run TOML file")
    sim.set_defaults(handler=_simulate)

    abtest = commands.add_parser(
        "abtest", help="federated A/B tests between model versions"
    ).add_subparsers(title="abtest commands")
    start = abtest.add_parser(
        "start", help="score two versions on every node's held-out data; paired tests"
    )
    start.add_argument("--config", required=True, type=Path, help="the run TOML (nodes, db)")
    start.add_argument("--a", required=True, help="version A (e.g. base)")
    start.add_argument("--b", required=True, help="version B (e.g. latest)")
    start.add_argument(
        "--metric",
        action="append",
        choices=["loss", "rouge-l", "exact-match"],
        help="repeat for several (default: loss and rouge-l)",
    )
    start.add_argument("--nodes", nargs="+", default=None, help="only these nodes' scores")
    start.add_argument("--alpha", type=float, default=0.05)
    start.add_argument("--max-examples", type=int, default=32, help="per node (default 32)")
    start.add_argument("--max-new-tokens", type=int, default=48, help="for ROUGE-L generation")
    start.set_defaults(handler=_abtest_start)
    show = abtest.add_parser("show", help="print a stored A/B test")
    show.add_argument("test_id")
    show.add_argument("--db", required=True, help="coordinator database URL or SQLite file")
    show.set_defaults(handler=_abtest_show)

    dashboard = commands.add_parser(
        "dashboard", help="the coordinator's dashboard (Streamlit, read-only on the database)"
    )
    dashboard.add_argument("--db", required=True, help="database URL or SQLite file")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.set_defaults(handler=_dashboard)

    audit = commands.add_parser(
        "audit", help="export, verify and report on a node's epsilon ledger"
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
    report.set_defaults(handler=_audit_report)

    db = commands.add_parser("db", help="the coordinator's database").add_subparsers(
        title="db commands"
    )
    upgrade = db.add_parser(
        "upgrade", help="migrate the coordinator's database to the newest schema, keeping rows"
    )
    upgrade.add_argument(
        "--database", "--db", dest="db", required=True, help="database URL or SQLite file"
    )
    upgrade.set_defaults(handler=_db_upgrade)
    return parser


def _db_upgrade(args: argparse.Namespace) -> int:
    from fedtune.platform.db.db_admin import db_upgrade

    return db_upgrade(args.db)


def _node_train(args: argparse.Namespace) -> int:
    from fedtune.client_node.node_train import run_node_training

    config = load_node_config(args.config)
    metrics = run_node_training(config, progress=not args.no_progress)
    print(_summary(metrics))
    return 0


def _node_key(args: argparse.Namespace) -> int:
    from fedtune.privacy.node_ledger import KEY_FILE, node_key

    config = load_node_config(args.config)
    print(node_key(config.node.state_dir).public_key_text())
    print(f"(key file {config.node.state_dir / KEY_FILE}; keep it private)", file=sys.stderr)
    return 0


def _data_demo(args: argparse.Namespace) -> int:
    domains = DOMAINS if args.domain == "all" else (args.domain,)
    # Every domain is checked before any is written: all or nothing.
    check_demo_output(args.out, domains, train=args.train, held_out=args.held_out)
    for domain in domains:
        train, held_out = write_demo_data(
            args.out, domain=domain, train=args.train, held_out=args.held_out, seed=args.seed
        )
        print(f"{domain}: {train} ({args.train} examples), {held_out} ({args.held_out})")
    return 0


def _model_fetch(args: argparse.Namespace) -> int:
    from fedtune.platform.model.fingerprint import model_dir_fingerprint
    from fedtune.platform.model.model_store import resolve_model_dir

    model_dir = resolve_model_dir(args.spec, cache_dir=args.cache_dir)
    print(f"{args.spec}: {model_dir}")
    print(f"fingerprint: {model_dir_fingerprint(model_dir)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedtune.demo.run import run_demo

    workdir: Path = args.workdir or Path("runs") / time.strftime("demo-%Y%m%dT%H%M%S")
    if args.deployment:
        from fedtune.demo.local_deployment import run_deployment_demo

        run_deployment_demo(workdir, rounds=args.rounds, steps=args.steps, model=args.model)
        return 0
    run_demo(workdir, rounds=args.rounds, steps=args.steps, model=args.model)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fedtune.coordinator.run_summary import format_summary, run_summary
    from fedtune.platform.db.storage import open_database
    from fedtune.simulation import simulate

    config = load_run_config(args.config)
    adapters = config.output.dir / "adapters"
    if adapters.exists() and any(adapters.iterdir()):
        raise ConfigError(
            f"{args.config}: output.dir {config.output.dir} already holds a run's "
            "adapters; choose a new output.dir"
        )
    run_id = simulate(config)
    print(format_summary(run_summary(open_database(config.database_url), run_id)))
    return 0


def _model_list(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.versions import list_versions, production_version
    from fedtune.platform.db.storage import open_database

    engine = open_database(database_url(args.db, must_exist=True), create=False)
    in_production = production_version(engine)
    print(f"{'version':<36} {'created (UTC)':<20} sha256")
    for version in list_versions(engine):
        created = version.created_at.strftime("%Y-%m-%d %H:%M:%S") if version.created_at else ""
        mark = "  <- in production" if version.id == in_production else ""
        print(f"{version.id:<36} {created:<20} {(version.sha256 or '')[:16]}{mark}")
    return 0


def _model_export(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.checkpoints import export_checkpoint
    from fedtune.coordinator.versions import resolve_version
    from fedtune.platform.db.storage import open_database
    from fedtune.platform.security.encryption import load_key

    engine = open_database(database_url(args.db, must_exist=True), create=False)
    version = resolve_version(engine, args.version)
    if version.path is None or version.sha256 is None:
        raise ConfigError(f"{version.id} is the base model: there is no adapter to export")
    key = load_key(args.key) if args.key is not None else None
    out = export_checkpoint(
        version.path, args.out, sha256=version.sha256, key=key, key_option="--key"
    )
    print(f"{version.id} -> {out} (load with PeftModel.from_pretrained(base, {str(out)!r}))")
    return 0


def _model_promote(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.versions import promote, resolve_version
    from fedtune.platform.db.storage import open_database

    engine = open_database(database_url(args.db, must_exist=True), create=False)
    version = resolve_version(engine, args.version)
    promote(engine, version, by=args.by, note=args.note)
    print(f"{version.id} is in production (promoted by {args.by})")
    return 0


def _abtest_start(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.abtest import DEFAULT_METRICS, AbTestPlan, abtest_report, format_abtest
    from fedtune.coordinator.versions import resolve_version
    from fedtune.platform.db.storage import open_database
    from fedtune.simulation import simulate_abtest

    config = load_run_config(args.config)
    engine = open_database(database_url(config.database_url, must_exist=True))
    a, b = resolve_version(engine, args.a), resolve_version(engine, args.b)
    # At most one side is `base`: the base model is the one the other side adapts.
    fingerprint = a.base_model_fingerprint or b.base_model_fingerprint or ""
    try:
        plan = AbTestPlan(
            version_a=a,
            version_b=b,
            base_model_fingerprint=fingerprint,
            metrics=tuple(dict.fromkeys(args.metric or DEFAULT_METRICS)),
            alpha=args.alpha,
            max_examples=args.max_examples,
            max_new_tokens=args.max_new_tokens,
            nodes=tuple(args.nodes) if args.nodes else None,
        )
    except ValueError as exc:
        raise ConfigError(f"abtest start: {exc}") from None
    test_id = simulate_abtest(config, plan)
    print(format_abtest(abtest_report(engine, test_id)))
    return 0


def _abtest_show(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.abtest import abtest_report, format_abtest
    from fedtune.platform.db.storage import open_database

    engine = open_database(database_url(args.db, must_exist=True), create=False)
    print(format_abtest(abtest_report(engine, args.test_id)))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from fedtune.dashboard.launch import run_dashboard

    return run_dashboard(args.db, host=args.host, port=args.port)


def _audit_export(args: argparse.Namespace) -> int:
    from fedtune.privacy.ledger_export import export_ledger

    count = export_ledger(args.db, node=args.node, out=args.out)
    print(f"{args.out}: {count} ledger entries of node {args.node}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from fedtune.privacy.ledger_file import format_verification, verify_ledger_file
    from fedtune.privacy.signing import load_public_key

    result = verify_ledger_file(args.ledger, public_key=load_public_key(args.public_key))
    print(format_verification(result))
    return 0 if result.ok else 1


def _audit_report(args: argparse.Namespace) -> int:
    from fedtune.privacy.audit.verify import audit_ledger, write_audit_report

    outcome = audit_ledger(args.ledger, public_key=args.public_key)
    path = write_audit_report(outcome, out=args.out)
    verdict = "verified" if outcome.verification.ok else f"FAILED: {outcome.verification.problem}"
    checked = [r for r in outcome.recomputations if not r.skipped]
    print(f"{path}: ledger {verdict}")
    print(
        f"  independent recomputation: {len(checked) - len(outcome.disagreements)} of "
        f"{len(checked)} private entries agree"
    )
    return 0 if outcome.ok else 1


def _summary(metrics: dict[str, Any]) -> str:
    from fedtune.client_node.local_round import NON_PRIVATE_LABEL

    privacy = metrics["privacy"]
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    if privacy["mode"] == "dp":
        privacy_line = (
            f"epsilon {privacy['epsilon_after']:.3f} (this round {privacy['epsilon_round']:.3f}) "
            f"at delta {privacy['delta']:g}, {privacy['method']} ({privacy['accountant']} "
            f"accountant, {privacy['accountant_version']}); noise multiplier "
            f"{privacy['noise_multiplier']:.3f}, sample rate {privacy['sample_rate']:.4f}, "
            f"clip norm {privacy['max_grad_norm']:g}"
        )
    else:
        privacy_line = NON_PRIVATE_LABEL
    return "\n".join(
        [
            f"node {metrics['node']}: {metrics['steps']} steps in "
            f"{metrics['training']['seconds']:.0f} s on {metrics['device']}",
            f"  held-out loss {before['loss']:.3f} -> {after['loss']:.3f}, "
            f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}",
            f"  privacy: {privacy_line}",
            f"  adapter: {metrics['adapter_dir']}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
