"""Bad input on the command line: every case ends in one line on stderr that names the
problem, a non-zero exit code, no traceback, and nothing stored changed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.privacy.signing import NodeKey

BINARY = bytes(range(256)) * 4
TLS = '[tls]\nca_certificate = "ca.pem"\ncertificate = "s.pem"\nprivate_key = "s.key"\n'


def fails_in_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], *names: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    # Only progress bars (a model loading) may come before the one line, which ends it.
    lines = err.replace("\r", "\n").strip().splitlines()
    assert lines[-1].startswith("fedtune: error: "), err
    assert [line for line in lines if "error" in line] == [lines[-1]], err
    for name in names:
        assert name in lines[-1], err
    return lines[-1]


def node_toml(tmp_path: Path, train: Path, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nname = "n"\n[data]\ntrain = "{train}"\neval = "{train}"\n'
        f'[output]\ndir = "out"\n{extra}'
    )
    return path


def test_a_binary_data_file_is_named(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n' + BINARY)
    config = node_toml(tmp_path, data, f'[model]\nspec = "{tiny_model_dir}"\n')

    fails_in_one_line(capsys, ["node", "train", "--config", str(config)], str(data), "UTF-8")


def test_a_binary_config_is_named(tmp_path, capsys):
    config = tmp_path / "node.toml"
    config.write_bytes(BINARY)

    fails_in_one_line(capsys, ["node", "key", "--config", str(config)], str(config), "UTF-8")


def test_a_folder_given_as_config_is_named(tmp_path, capsys):
    fails_in_one_line(capsys, ["node", "key", "--config", str(tmp_path)], str(tmp_path), "folder")


def test_a_string_for_a_number_in_a_config_is_refused_naming_key_and_file(tmp_path, capsys):
    config = node_toml(tmp_path, tmp_path / "t.jsonl", '[privacy]\ntarget_epsilon = "8"\n')

    fails_in_one_line(
        capsys, ["node", "key", "--config", str(config)], str(config), "privacy.target_epsilon"
    )


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_non_finite_epsilon_is_refused_when_the_config_is_read(tmp_path, capsys, value):
    config = node_toml(tmp_path, tmp_path / "t.jsonl", f"[privacy]\ntarget_epsilon = {value}\n")

    fails_in_one_line(
        capsys, ["node", "key", "--config", str(config)], str(config), "privacy.target_epsilon"
    )
    assert not (tmp_path / "node-state").exists()  # refused before anything is made


def test_a_path_as_coordinator_database_names_the_key_and_file(tmp_path, capsys):
    config = tmp_path / "coordinator.toml"
    config.write_text(f'[coordinator]\ndatabase = "{tmp_path / "x.db"}"\n{TLS}')

    fails_in_one_line(
        capsys,
        ["run", "status", "--coordinator", str(config)],
        str(config),
        "coordinator.database",
    )
    assert not (tmp_path / "x.db").exists()


def test_a_binary_enrollment_file_is_named(tmp_path, capsys):
    enrollment = tmp_path / "enrollment.json"
    enrollment.write_bytes(BINARY)
    config = tmp_path / "coordinator.toml"
    config.write_text(f'[coordinator]\nstate_dir = "state"\n{TLS}')
    certify = ["certs", "certify-node", str(enrollment), "--name", "a", "--ca-dir", str(tmp_path)]

    fails_in_one_line(
        capsys, [*certify, "--out", str(tmp_path / "a.json")], str(enrollment), "UTF-8"
    )
    fails_in_one_line(
        capsys,
        ["coordinator", "enroll", str(enrollment), "--name", "a", "--config", str(config)],
        str(enrollment),
        "is not certified",
    )
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "a.json").exists()


def test_enrollment_values_are_never_opened_as_paths(tmp_path, capsys):
    """A value naming a key file on the admin's machine is refused as not being a key."""
    key = NodeKey.load_or_create(tmp_path / "admin" / "node_key.pem")
    admin_file = tmp_path / "admin" / "public.pem"
    admin_file.write_text(key.public_key_text())
    enrollment = tmp_path / "enrollment.json"
    enrollment.write_text(
        json.dumps({"auth_public_key": str(admin_file), "ledger_public_key": str(admin_file)})
    )
    certify = ["certs", "certify-node", str(enrollment), "--name", "a", "--ca-dir", str(tmp_path)]

    fails_in_one_line(capsys, [*certify, "--out", str(tmp_path / "a.json")], "auth_public_key")
    assert not (tmp_path / "a.json").exists()


def test_a_ledger_headers_key_is_never_opened_as_a_path(tmp_path):
    from fedtune.common.keyfiles import KeyFileError
    from fedtune.privacy.signing import public_key_from_text

    key = NodeKey.load_or_create(tmp_path / "node_key.pem")
    admin_file = tmp_path / "public.b64"
    admin_file.write_text(key.public_key_text())

    with pytest.raises(KeyFileError, match="header"):
        public_key_from_text(str(admin_file), source="the header")


def test_audit_verify_of_a_missing_file_or_a_folder_is_named(tmp_path, capsys):
    key = NodeKey.load_or_create(tmp_path / "node_key.pem").public_key_text()
    missing = tmp_path / "missing.jsonl"

    fails_in_one_line(capsys, ["audit", "verify", str(missing), "--public-key", key], str(missing))
    fails_in_one_line(
        capsys, ["audit", "verify", str(tmp_path), "--public-key", key], str(tmp_path), "folder"
    )


def test_audit_export_of_a_file_that_is_not_sqlite_is_named(tmp_path, capsys):
    db = tmp_path / "ledger.db"
    db.write_text("not a database\n" * 100)
    out = tmp_path / "out.jsonl"

    fails_in_one_line(
        capsys,
        ["audit", "export", "--db", str(db), "--node", "a", "--out", str(out)],
        str(db),
        "SQLite",
    )
    assert db.read_text() == "not a database\n" * 100 and not out.exists()


def test_db_upgrade_makes_no_missing_folders(tmp_path, capsys):
    target = tmp_path / "nonexistent" / "dir" / "x.db"

    fails_in_one_line(
        capsys, ["db", "upgrade", "--database", str(target)], str(tmp_path / "nonexistent")
    )
    assert not (tmp_path / "nonexistent").exists()


def test_data_demo_never_overwrites_existing_data(tmp_path, capsys):
    train = tmp_path / "hospital" / "train.jsonl"
    train.parent.mkdir()
    train.write_text("precious\n")

    fails_in_one_line(capsys, ["data", "demo", "--out", str(tmp_path)], str(train), "overwritten")
    assert train.read_text() == "precious\n"
    assert not (tmp_path / "bank").exists()  # all or nothing
    assert not (tmp_path / "hospital" / "held_out.jsonl").exists()


def test_data_demo_at_a_file_is_named(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("x")

    fails_in_one_line(capsys, ["data", "demo", "--out", str(out)], str(out), "not a folder")
    assert out.read_text() == "x"


@pytest.mark.parametrize("option", ["--train", "--held-out"])
@pytest.mark.parametrize("count", ["-5", "0"])
def test_data_demo_refuses_counts_below_one(tmp_path, capsys, option, count):
    fails_in_one_line(capsys, ["data", "demo", "--out", str(tmp_path), option, count], count)
    assert not any(tmp_path.iterdir())


def test_model_export_of_an_encrypted_checkpoint_without_key_names_the_option(
    tmp_path, capsys, monkeypatch
):
    import fedtune.coordinator.versions as versions
    from fedtune.coordinator.checkpoints import ENCRYPTED_WEIGHTS_FILE

    adapter = tmp_path / "adapters" / "round-1"
    adapter.mkdir(parents=True)
    (adapter / ENCRYPTED_WEIGHTS_FILE).write_bytes(b"sealed")
    (adapter / "adapter_config.json").write_text("{}")
    version = versions.ModelVersion(
        id="run/1", run_id="run", round=1, sha256="0" * 64, path=adapter
    )
    monkeypatch.setattr(versions, "resolve_version", lambda engine, text: version)
    db = tmp_path / "fedtune.db"
    sqlite3.connect(db).close()
    out = tmp_path / "export"

    fails_in_one_line(
        capsys,
        ["model", "export", "run/1", "--db", str(db), "--out", str(out)],
        ENCRYPTED_WEIGHTS_FILE,
        "--key",
    )
    assert not out.exists()
