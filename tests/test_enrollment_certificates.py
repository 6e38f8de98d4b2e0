"""The CA holder certifies a node's enrollment.json; the coordinator enrolls only what the
consortium's CA certified, under the name it certified."""

from __future__ import annotations

import json

import pytest

from fedtune.cli import main
from fedtune.common.keyfiles import KeyFileError
from fedtune.coordinator.enrollment import ENROLLMENT_FILE, read_certified_enrollment
from fedtune.platform.security.enrollment_certificates import (
    load_ca_certificate,
    verify_certificate,
)
from fedtune.platform.security.tls import init_certificates


@pytest.fixture
def keys(tmp_path):
    """A consortium CA, another CA, and a node's keys from `fedtune node keygen`."""
    assert main(["node", "keygen", "--out", str(tmp_path / "state")]) == 0
    return {
        "ca": init_certificates(tmp_path / "ca"),
        "other_ca": init_certificates(tmp_path / "other-ca"),
        "enrollment": tmp_path / "state" / ENROLLMENT_FILE,
    }


def certify(keys, out, *, name="hospital", ca="ca") -> int:
    return main(
        [
            "certs",
            "certify-node",
            str(keys["enrollment"]),
            "--name",
            name,
            "--ca-dir",
            str(keys[ca].ca_cert.parent),
            "--out",
            str(out),
        ]
    )


def test_a_certified_enrollment_names_the_node_and_its_keys(keys, tmp_path, capsys):
    out = tmp_path / "hospital.certified.json"

    assert certify(keys, out) == 0

    assert "certified node hospital" in capsys.readouterr().out
    node = verify_certificate(out.read_bytes(), load_ca_certificate(keys["ca"].ca_cert))
    enrolled = json.loads(keys["enrollment"].read_text())
    assert node.name == "hospital"
    assert node.ledger_public_key == enrolled["ledger_public_key"]
    assert node.auth_public_key.split()[:2] == enrolled["auth_public_key"].split()[:2]
    enrollment, text = read_certified_enrollment(out, keys["ca"].ca_cert, name="hospital")
    assert enrollment.ledger_public_key == enrolled["ledger_public_key"]
    assert text == out.read_text()


def test_certifying_never_overwrites_a_file(keys, tmp_path, capsys):
    out = tmp_path / "taken.json"
    out.write_text("keep me")

    assert certify(keys, out) == 2

    assert capsys.readouterr().err.strip().endswith("exists already; choose another --out")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xff\xfe\x00", "not UTF-8 text"),
        (b"{}", "not an enrollment file"),
        (b'{"auth_public_key": 1, "ledger_public_key": 2}', "expected an object with the strings"),
        (b'{"auth_public_key": "ssh-rsa AAAA", "ledger_public_key": "eA=="}', ""),
    ],
)
def test_a_bad_enrollment_file_is_refused_in_one_line(keys, tmp_path, capsys, content, problem):
    keys["enrollment"].write_bytes(content)

    assert certify(keys, tmp_path / "out.json") == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedtune: error: ") and problem in err
    assert not (tmp_path / "out.json").exists()


def test_the_coordinator_refuses_an_uncertified_enrollment(keys):
    with pytest.raises(KeyFileError, match=r"is not certified: .*fedtune certs certify-node"):
        read_certified_enrollment(keys["enrollment"], keys["ca"].ca_cert, name="hospital")


def test_the_coordinator_refuses_a_certificate_from_another_ca(keys, tmp_path):
    out = tmp_path / "rogue.json"
    assert certify(keys, out, ca="other_ca") == 0

    with pytest.raises(KeyFileError, match="not signed by the consortium's CA"):
        read_certified_enrollment(out, keys["ca"].ca_cert, name="hospital")


def test_the_coordinator_refuses_a_certificate_for_another_name(keys, tmp_path):
    out = tmp_path / "bank.json"
    assert certify(keys, out, name="bank") == 0

    with pytest.raises(KeyFileError, match="certifies node 'bank', not 'hospital'"):
        read_certified_enrollment(out, keys["ca"].ca_cert, name="hospital")
