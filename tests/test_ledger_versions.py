"""Versioned ledger entries: version-1 ledgers (fedtune 0.1, no ``format``) keep verifying,
new entries say their format, kind, method and privacy unit, and a reader refuses what a
newer fedtune wrote with a message that says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_ledger import round_fields

from fedtune.privacy.ledger import (
    ENTRY_FORMAT,
    GENESIS_HASH,
    V1_PAYLOAD_FIELDS,
    VERSIONED_FIELDS,
    LedgerEntry,
    LedgerFormatError,
    entry_hash,
    seal_entry,
    sign_checkpoint,
    verify_chain,
)
from fedtune.privacy.ledger_file import read_ledger_file, verify_ledger_file, write_ledger_file
from fedtune.privacy.signing import NodeKey

V1_FIELDS: dict[str, Any] = {  # a DP round as fedtune 0.1 sealed it
    name: value for name, value in round_fields().items() if name not in VERSIONED_FIELDS
}
VERSIONED = {"kind": "training_round", "method": "dp-sgd", "privacy_unit": "example"}


@pytest.fixture(scope="module")
def key() -> NodeKey:
    return NodeKey.generate()


def seal_v1(key: NodeKey, previous: LedgerEntry | None, **overrides: Any) -> LedgerEntry:
    """An entry sealed as fedtune 0.1 sealed it: the version-1 payload, no format field."""
    payload = {
        **V1_FIELDS,
        **overrides,
        "seq": 1 if previous is None else previous.seq + 1,
        "prev_hash": GENESIS_HASH if previous is None else previous.hash,
    }
    assert set(payload) == set(V1_PAYLOAD_FIELDS)
    digest = entry_hash(payload)
    return LedgerEntry(**payload, hash=digest, signature=key.sign(bytes.fromhex(digest)))


def test_new_entries_carry_their_format_kind_method_and_privacy_unit(key: NodeKey) -> None:
    entry = seal_entry({**V1_FIELDS, **VERSIONED}, previous=None, key=key)

    assert (entry.format, entry.kind, entry.method, entry.privacy_unit) == (
        ENTRY_FORMAT,
        "training_round",
        "dp-sgd",
        "example",
    )
    assert {"format", "kind", "method", "privacy_unit"} <= set(entry.payload())
    assert LedgerEntry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry


def test_a_version_one_ledger_still_verifies_and_version_two_entries_extend_it(
    key: NodeKey,
) -> None:
    first = seal_v1(key, None)
    second = seal_v1(key, first, round=2, epsilon_after=1.0)
    third = seal_entry({**V1_FIELDS, **VERSIONED, "round": 3}, previous=second, key=key)
    chain = [first, second, third]

    result = verify_chain(
        chain,
        public_key=key.public_key,
        checkpoint=sign_checkpoint(node="hospital-a", head=third, key=key),
    )

    assert result.ok, result.problem
    assert "format" not in first.to_dict()  # re-read as it was signed
    assert LedgerEntry.from_dict(first.to_dict()) == first
    assert (first.entry_kind, first.privacy_method, first.protected_unit) == (
        "training_round",
        "dp-sgd",
        "example",
    )


def test_a_version_one_entry_after_a_version_two_one_is_refused(key: NodeKey) -> None:
    first = seal_entry({**V1_FIELDS, **VERSIONED}, previous=None, key=key)
    downgraded = seal_v1(key, first, round=2)

    result = verify_chain(
        [first, downgraded],
        public_key=key.public_key,
        checkpoint=sign_checkpoint(node="hospital-a", head=downgraded, key=key),
    )

    assert not result.ok and result.problem is not None
    assert result.problem.seq == 2
    assert "older format" in result.problem.reason


def test_an_entry_from_a_newer_fedtune_is_refused_saying_so(key: NodeKey) -> None:
    data = seal_entry({**V1_FIELDS, **VERSIONED}, previous=None, key=key).to_dict()

    with pytest.raises(LedgerFormatError, match=r"fedtune-entry/3.*upgrade fedtune"):
        LedgerEntry.from_dict({**data, "format": "fedtune-entry/3"})
    with pytest.raises(LedgerFormatError, match=r"kind 'dp_query'.*upgrade fedtune"):
        LedgerEntry.from_dict({**data, "kind": "dp_query"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "none"}, "needs a method other than 'none'"),
        ({"privacy_unit": None}, "privacy_unit of a dp-sgd entry must be 'example'"),
        (
            {"method": "node-level-dp", "privacy_unit": "example"},
            "privacy_unit of a node-level-dp entry must be 'node'",
        ),
        ({"kind": "metric_release"}, "made private by the 'gaussian' method"),
        ({"method": "magic"}, "method must be one of"),
        (
            {"mode": "non-private", "epsilon_round": None, "method": "dp-sgd"},
            "method is 'none'",
        ),
        (
            {"mode": "non-private", "epsilon_round": None, "method": "none"},
            "privacy_unit must be null",
        ),
    ],
)
def test_method_and_privacy_unit_must_fit_the_mode(
    key: NodeKey, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        seal_entry({**V1_FIELDS, **VERSIONED, **overrides}, previous=None, key=key)


def test_seal_entry_asks_for_the_versioned_fields(key: NodeKey) -> None:
    with pytest.raises(ValueError, match="missing ledger fields: kind, method, privacy_unit"):
        seal_entry(V1_FIELDS, previous=None, key=key)


def test_ledger_files_of_every_format_are_read_and_a_newer_one_is_refused(
    key: NodeKey, tmp_path: Path
) -> None:
    first = seal_v1(key, None)
    second = seal_entry({**V1_FIELDS, **VERSIONED, "round": 2}, previous=first, key=key)
    path = tmp_path / "ledger.jsonl"
    write_ledger_file(
        path,
        node="hospital-a",
        public_key=key.public_key_text(),
        entries=[first, second],
        checkpoint=sign_checkpoint(node="hospital-a", head=second, key=key),
    )
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "fedtune-ledger/3"
    assert verify_ledger_file(path, public_key=key.public_key).ok
    before_receipts = tmp_path / "v2.jsonl"  # fedtune 0.2 wrote /2: no receipts
    before_receipts.write_text(
        "\n".join([json.dumps({**json.loads(lines[0]), "format": "fedtune-ledger/2"}), *lines[1:]])
    )
    assert verify_ledger_file(before_receipts, public_key=key.public_key).ok

    old = tmp_path / "old.jsonl"  # as fedtune 0.1 wrote it: a /1 header, version-1 entries
    write_ledger_file(
        old,
        node="hospital-a",
        public_key=key.public_key_text(),
        entries=[first],
        checkpoint=sign_checkpoint(node="hospital-a", head=first, key=key),
    )
    old_lines = old.read_text().splitlines()
    header = {**json.loads(old_lines[0]), "format": "fedtune-ledger/1"}
    old.write_text("\n".join([json.dumps(header), *old_lines[1:]]) + "\n")
    assert verify_ledger_file(old, public_key=key.public_key).ok

    newer = tmp_path / "newer.jsonl"
    newer.write_text("\n".join([json.dumps({**header, "format": "fedtune-ledger/4"}), *lines[1:]]))
    with pytest.raises(LedgerFormatError, match=r"fedtune-ledger/4.*upgrade fedtune"):
        read_ledger_file(newer)
