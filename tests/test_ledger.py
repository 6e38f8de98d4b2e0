"""The epsilon ledger's entries, hashes, signatures, checkpoints and node keys."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import stat
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from fedtune.privacy.ledger import (
    GENESIS_HASH,
    PAYLOAD_FIELDS,
    LedgerEntry,
    LedgerFormatError,
    check_entry,
    entry_hash,
    seal_entry,
    sign_checkpoint,
    verify_chain,
)
from fedtune.privacy.signing import (
    NodeKey,
    load_public_key,
    public_key_path,
    public_key_text,
    verify_signature,
)


def round_fields(**overrides: Any) -> dict[str, Any]:
    """The fields of one DP round, as a node hands them to ``seal_entry``."""
    fields: dict[str, Any] = {
        "node": "hospital-a",
        "run_id": "run-1",
        "round": 1,
        "base_model_fingerprint": "sha256:" + "b" * 64,
        "data_fingerprint": "sha256:" + "d" * 64,
        "mode": "dp",
        "steps": 20,
        "sample_rate": 0.01,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "epsilon_round": 0.5,
        "epsilon_after": 0.5,
        "epsilon_cap": 8.0,
        "accountant": "rdp",
        "accountant_version": "opacus-1.6.0",
        "kind": "training_round",
        "method": "dp-sgd",
        "privacy_unit": "example",
        "recorded_at": "2026-11-23T19:00:00.123456Z",
    }
    fields.update(overrides)
    return fields


def seal_chain(key: NodeKey, count: int) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    for index in range(count):
        fields = round_fields(round=index + 1, epsilon_after=0.5 * (index + 1))
        entries.append(seal_entry(fields, previous=entries[-1] if entries else None, key=key))
    return entries


@pytest.fixture(scope="module")
def key() -> NodeKey:
    return NodeKey.generate()


def test_sealed_chain_with_signed_head_verifies(key: NodeKey) -> None:
    entries = seal_chain(key, 4)
    checkpoint = sign_checkpoint(node="hospital-a", head=entries[-1], key=key)

    result = verify_chain(entries, public_key=key.public_key, checkpoint=checkpoint)

    assert result.ok, result.problem
    assert result.entries_checked == 4


def test_entries_are_numbered_from_one_and_chained_from_genesis(key: NodeKey) -> None:
    entries = seal_chain(key, 3)

    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS_HASH
    assert [e.prev_hash for e in entries[1:]] == [e.hash for e in entries[:-1]]


def test_hash_is_sha256_of_previous_hash_bytes_then_canonical_payload(key: NodeKey) -> None:
    first, second = seal_chain(key, 2)
    payload = {name: getattr(second, name) for name in PAYLOAD_FIELDS}

    expected = hashlib.sha256(bytes.fromhex(first.hash) + rfc8785.dumps(payload)).hexdigest()

    assert second.hash == expected
    assert entry_hash(second.payload()) == expected


def test_signature_is_ed25519_over_the_raw_hash_bytes(key: NodeKey) -> None:
    (entry,) = seal_chain(key, 1)

    signature = base64.b64decode(entry.signature, validate=True)

    key.public_key.verify(signature, bytes.fromhex(entry.hash))  # raises if it does not


@pytest.mark.parametrize("name", ["epsilon_after", "sample_rate", "noise_multiplier", "delta"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_number_is_refused_naming_the_field(
    key: NodeKey, name: str, value: float
) -> None:
    with pytest.raises(ValueError, match=name):
        seal_entry(round_fields(**{name: value}), previous=None, key=key)


def test_non_private_round_is_sealed_with_null_privacy_fields(key: NodeKey) -> None:
    nulls = dict.fromkeys(
        [
            "noise_multiplier",
            "max_grad_norm",
            "delta",
            "epsilon_round",
            "epsilon_after",
            "epsilon_cap",
            "accountant",
            "accountant_version",
        ]
    )
    entry = seal_entry(
        round_fields(mode="non-private", method="none", privacy_unit=None, **nulls),
        previous=None,
        key=key,
    )

    assert entry.mode == "non-private"
    assert entry.epsilon_after is None
    assert entry.content_matches()


def test_non_private_round_may_record_a_batch_share_above_one(key: NodeKey) -> None:
    nulls = dict.fromkeys(["noise_multiplier", "delta", "epsilon_round", "epsilon_after"])
    fields = round_fields(
        mode="non-private", method="none", privacy_unit=None, sample_rate=2.0, **nulls
    )

    entry = seal_entry(fields, previous=None, key=key)

    assert entry.sample_rate == 2.0


def test_dp_round_with_sample_rate_above_one_is_refused(key: NodeKey) -> None:
    with pytest.raises(ValueError, match="sample_rate of a dp round"):
        seal_entry(round_fields(sample_rate=1.5), previous=None, key=key)


def test_dp_round_without_epsilon_is_refused(key: NodeKey) -> None:
    with pytest.raises(ValueError, match="epsilon_after"):
        seal_entry(round_fields(epsilon_after=None), previous=None, key=key)


def test_seal_entry_names_a_missing_field(key: NodeKey) -> None:
    fields = round_fields()
    del fields["data_fingerprint"]

    with pytest.raises(ValueError, match="missing ledger fields: data_fingerprint"):
        seal_entry(fields, previous=None, key=key)


def test_seal_entry_refuses_a_seq_of_its_own(key: NodeKey) -> None:
    with pytest.raises(ValueError, match="derives seq"):
        seal_entry(round_fields(seq=5), previous=None, key=key)


def test_seal_entry_refuses_another_nodes_entry_after_this_one(key: NodeKey) -> None:
    (first,) = seal_chain(key, 1)

    with pytest.raises(ValueError, match="bank-b"):
        seal_entry(round_fields(node="bank-b"), previous=first, key=key)


def test_integer_sample_rate_hashes_like_the_float(key: NodeKey) -> None:
    entry = seal_entry(round_fields(sample_rate=1), previous=None, key=key)

    assert entry.sample_rate == 1.0 and isinstance(entry.sample_rate, float)
    assert entry.content_matches()


def test_entry_round_trips_through_its_dict(key: NodeKey) -> None:
    entry = seal_chain(key, 2)[1]

    assert LedgerEntry.from_dict(entry.to_dict()) == entry


def test_from_dict_names_missing_and_unknown_fields(key: NodeKey) -> None:
    data = seal_chain(key, 1)[0].to_dict()
    del data["steps"]
    data["comment"] = "hello"

    with pytest.raises(LedgerFormatError, match=r"missing fields: steps.*unknown fields: comment"):
        LedgerEntry.from_dict(data)


def test_from_dict_names_a_field_of_the_wrong_type(key: NodeKey) -> None:
    data = seal_chain(key, 1)[0].to_dict()
    data["steps"] = "20"

    with pytest.raises(LedgerFormatError, match="steps must be an integer"):
        LedgerEntry.from_dict(data)


def test_check_entry_says_an_edited_entry_no_longer_matches_its_hash(key: NodeKey) -> None:
    first, second = seal_chain(key, 2)
    edited = dataclasses.replace(second, epsilon_after=0.1)

    reason = check_entry(edited, previous=first, public_key=key.public_key)

    assert reason is not None and "edited" in reason


def test_check_entry_says_a_skipped_seq_means_missing_entries(key: NodeKey) -> None:
    first, _, third = seal_chain(key, 3)

    reason = check_entry(third, previous=first, public_key=key.public_key)

    assert reason is not None and "seq 2 is missing" in reason


def test_chain_without_checkpoint_fails(key: NodeKey) -> None:
    entries = seal_chain(key, 2)

    result = verify_chain(entries, public_key=key.public_key, checkpoint=None)

    assert not result.ok
    assert result.problem is not None and "no signed checkpoint" in result.problem.reason


def test_checkpoint_of_another_key_fails(key: NodeKey) -> None:
    entries = seal_chain(key, 2)
    forged = sign_checkpoint(node="hospital-a", head=entries[-1], key=NodeKey.generate())

    result = verify_chain(entries, public_key=key.public_key, checkpoint=forged)

    assert result.problem is not None
    assert "checkpoint's signature does not match" in result.problem.reason


def test_empty_ledger_with_signed_checkpoint_verifies(key: NodeKey) -> None:
    checkpoint = sign_checkpoint(node="hospital-a", head=None, key=key)

    result = verify_chain([], public_key=key.public_key, checkpoint=checkpoint)

    assert result.ok
    assert (checkpoint.seq, checkpoint.head_hash) == (0, GENESIS_HASH)


def test_checkpoint_signature_covers_canonical_json_of_its_fields(key: NodeKey) -> None:
    checkpoint = sign_checkpoint(node="hospital-a", head=seal_chain(key, 1)[0], key=key)
    message = rfc8785.dumps(
        {
            "node": checkpoint.node,
            "seq": checkpoint.seq,
            "head_hash": checkpoint.head_hash,
            "signed_at": checkpoint.signed_at,
        }
    )

    assert verify_signature(key.public_key, signature=checkpoint.signature, message=message)


def test_checkpoint_round_trips_through_its_dict(key: NodeKey) -> None:
    checkpoint = sign_checkpoint(node="hospital-a", head=None, key=key)

    assert type(checkpoint).from_dict(checkpoint.to_dict()) == checkpoint


def test_node_key_file_is_created_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"

    created = NodeKey.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_path(path).exists()
    assert NodeKey.load_or_create(path).public_key_text() == created.public_key_text()


def test_loaded_key_signs_what_the_written_public_key_verifies(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeKey.load_or_create(path)

    signature = NodeKey.load(path).sign(b"round 1")

    public_key = load_public_key(public_key_path(path))
    assert verify_signature(public_key, signature=signature, message=b"round 1")


def test_load_public_key_accepts_a_pem_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key = NodeKey.load_or_create(path)

    loaded = load_public_key(str(public_key_path(path)))

    assert public_key_text(loaded) == key.public_key_text()


def test_load_public_key_accepts_base64_text_and_a_file_holding_it(tmp_path: Path) -> None:
    key = NodeKey.generate()
    text_file = tmp_path / "node.pub.txt"
    text_file.write_text(key.public_key_text() + "\n")

    from_text = load_public_key(key.public_key_text())
    from_file = load_public_key(text_file)

    assert public_key_text(from_text) == public_key_text(from_file) == key.public_key_text()


def test_load_public_key_rejects_text_that_is_no_key() -> None:
    with pytest.raises(ValueError, match="neither a public-key file"):
        load_public_key("not-a-key")


def test_load_public_key_refuses_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeKey.load_or_create(path)

    with pytest.raises(ValueError, match="is a private key"):
        load_public_key(path)


def test_signature_of_another_message_does_not_verify() -> None:
    key = NodeKey.generate()

    signature = key.sign(b"round 1")

    assert not verify_signature(key.public_key, signature=signature, message=b"round 2")
    assert not verify_signature(key.public_key, signature="not base64!", message=b"round 1")
