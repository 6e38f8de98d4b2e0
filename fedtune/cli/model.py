"""`fedtune model`: base models and model versions (fetch, list, promote, export)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedtune.platform.config import (
    ConfigError,
)


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
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


def _model_fetch(args: argparse.Namespace) -> int:
    from fedtune.platform.model.fingerprint import model_dir_fingerprint
    from fedtune.platform.model.model_store import resolve_model_dir

    model_dir = resolve_model_dir(args.spec, cache_dir=args.cache_dir)
    print(f"{args.spec}: {model_dir}")
    print(f"fingerprint: {model_dir_fingerprint(model_dir)}")
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


def _model_promote(args: argparse.Namespace) -> int:
    from fedtune.common.database import database_url
    from fedtune.coordinator.versions import promote, resolve_version
    from fedtune.platform.db.storage import open_database

    engine = open_database(database_url(args.db, must_exist=True), create=False)
    version = resolve_version(engine, args.version)
    promote(engine, version, by=args.by, note=args.note)
    print(f"{version.id} is in production (promoted by {args.by})")
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
