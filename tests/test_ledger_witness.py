"""A witnessed ledger: the coordinator countersigns each head it receives, and a rolled-back or
forked ledger fails verification given the coordinator's witness key or its copy.

The attacker here holds the node's own signing key (a node operator who wants its spending to
look smaller): it can re-sign anything of its own, but not the coordinator's receipts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rfc8785
from test_ledger_tamper import NODE, round_fields, seal_ledger

from fedtune.common.database import transaction
from fedtune.privacy.ledger import LedgerEntry, seal_entry, sign_checkpoint
from fedtune.privacy.ledger_file import format_verification, verify_ledger_file, write_ledger_file
from fedtune.privacy.ledger_store import ledger_receipts
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.privacy.receipts import Receipt, sign_receipt, witness_of
from fedtune.privacy.signing import NodeKey

NODE_KEY = NodeKey.generate()
WITNESS = NodeKey.generate()


def export(
    path: Path,
    entries: list[LedgerEntry],
    receipts: list[Receipt],
    *,
    key: NodeKey = NODE_KEY,
) -> Path:
    write_ledger_file(
        path,
        node=NODE,
        public_key=key.public_key,
        entries=entries,
        checkpoint=sign_checkpoint(node=NODE, head=entries[-1], key=key),
        receipts=receipts,
    )
    return path


def verify(path: Path, **options: object) -> tuple[bool, str]:
    result = verify_ledger_file(path, public_key=NODE_KEY.public_key, **options)  # type: ignore[arg-type]
    return result.ok, format_verification(result)


@pytest.fixture(scope="module")
def ledger() -> list[LedgerEntry]:
    return seal_ledger(NODE_KEY, 4)


def test_an_honest_witnessed_ledger_verifies_up_to_its_last_receipt(ledger, tmp_path):
    path = export(tmp_path / "l.jsonl", ledger, [witness_of(e, WITNESS) for e in ledger])

    ok, text = verify(path, witness_key=WITNESS.public_key)

    assert ok, text
    assert "witnessed by the coordinator up to seq 4" in text


def test_checkpoint_swap_rollback_passes_alone_and_fails_given_the_witness_key(ledger, tmp_path):
    """Drop the last entry and sign (or put back) the previous head: without a witness the
    prefix is a valid ledger; the coordinator's receipt for seq 4 says otherwise."""
    receipts = [witness_of(e, WITNESS) for e in ledger]
    path = export(tmp_path / "l.jsonl", ledger[:3], receipts)

    alone_ok, alone = verify(path)
    ok, text = verify(path, witness_key=WITNESS.public_key)

    assert alone_ok and "receipts from the coordinator not checked" in alone
    assert not ok
    assert "rolled back: the coordinator witnessed seq 4" in text and "ends at seq 3" in text


def test_a_forked_ledger_fails_given_the_witness_key(ledger, tmp_path):
    """Seq 4 rewritten with a smaller epsilon and re-signed by the node's own key."""
    fields = {k: v for k, v in ledger[3].payload().items() if k not in ("seq", "prev_hash")}
    forged = seal_entry(
        {**fields, "epsilon_after": 0.1, "epsilon_round": 0.1}, previous=ledger[2], key=NODE_KEY
    )
    path = export(
        tmp_path / "l.jsonl", [*ledger[:3], forged], [witness_of(e, WITNESS) for e in ledger]
    )

    assert verify(path)[0]  # the node's key alone cannot tell
    ok, text = verify(path, witness_key=WITNESS.public_key)

    assert not ok and "forked: the coordinator witnessed seq 4 with hash" in text


def test_rollback_with_the_receipts_removed_fails_against_the_coordinators_copy(ledger, tmp_path):
    """The full database rewrite: entries, checkpoint and receipts after seq 2 gone. The file
    alone is a valid, witnessed prefix; the coordinator's copy shows the later entries."""
    receipts = [witness_of(e, WITNESS) for e in ledger]
    rolled = export(tmp_path / "node.jsonl", ledger[:2], receipts[:2])
    copy = export(tmp_path / "coordinator.jsonl", ledger, receipts)

    assert verify(rolled, witness_key=WITNESS.public_key)[0]
    ok, text = verify(rolled, coordinator_copy=copy)
    witnessed_ok, witnessed_text = verify(
        rolled, coordinator_copy=copy, witness_key=WITNESS.public_key
    )

    assert not ok and "rolled back: the coordinator's copy holds seq 3" in text
    assert not witnessed_ok and "rolled back" in witnessed_text


def test_a_fork_fails_against_the_coordinators_copy_without_any_receipt(ledger, tmp_path):
    fields = {k: v for k, v in ledger[1].payload().items() if k not in ("seq", "prev_hash")}
    forged = seal_entry({**fields, "epsilon_after": 0.2}, previous=ledger[0], key=NODE_KEY)
    node_file = export(tmp_path / "node.jsonl", [ledger[0], forged], [])
    copy = export(tmp_path / "coordinator.jsonl", ledger[:2], [])

    ok, text = verify(node_file, coordinator_copy=copy)

    assert not ok and "forked: the coordinator's copy holds seq 2 with hash" in text


def test_a_copy_whose_entries_the_node_did_not_sign_is_not_evidence(ledger, tmp_path):
    other = NodeKey.generate()
    node_file = export(tmp_path / "node.jsonl", ledger[:2], [])
    copy = export(tmp_path / "coordinator.jsonl", seal_ledger(other, 3), [], key=other)

    ok, text = verify(node_file, coordinator_copy=copy)

    assert not ok and "the coordinator's copy cannot be compared" in text


@pytest.mark.parametrize("forgery", ["other key", "other witness named", "edited"])
def test_a_receipt_the_witness_did_not_make_fails(ledger, tmp_path, forgery):
    impostor = NodeKey.generate()
    receipt = witness_of(ledger[-1], WITNESS)
    if forgery == "other key":  # names the real witness, signed by another key
        fields = {k: v for k, v in receipt.to_dict().items() if k != "signature"}
        receipt = Receipt(**fields, signature=impostor.sign(rfc8785.dumps(fields)))
    elif forgery == "other witness named":
        receipt = witness_of(ledger[-1], impostor)
    else:
        receipt = Receipt(**{**receipt.to_dict(), "witnessed_at": "2020-01-01T00:00:00.000000Z"})
    path = export(tmp_path / "l.jsonl", ledger, [receipt])

    ok, text = verify(path, witness_key=WITNESS.public_key)

    if forgery == "other witness named":  # not the trusted witness's: set aside, noted
        assert ok and "1 receipts from other witnesses set aside" in text
        assert "no receipt from the witness" in text
    else:
        assert not ok
        assert "receipt for seq 4: signature does not match the witness key" in text


def test_a_malformed_receipt_line_names_its_line(ledger, tmp_path):
    path = export(tmp_path / "l.jsonl", ledger, [witness_of(ledger[-1], WITNESS)])
    lines = path.read_text().splitlines()
    receipt = json.loads(lines[-1])
    receipt["seq"] = "four"
    path.write_text("\n".join([*lines[:-1], json.dumps(receipt)]) + "\n")

    ok, text = verify(path, witness_key=WITNESS.public_key)

    assert not ok and f"line {len(lines)}" in text and "seq must be an integer" in text


def test_a_node_keeps_only_receipts_for_heads_it_holds(tmp_path):
    ledger = NodeLedger(tmp_path / "state", node=NODE)
    entry, _ = ledger.append(_fields(1))
    other = seal_ledger(NodeKey.generate(), 1)[0]

    assert ledger.keep_receipt(witness_of(entry, WITNESS)) is None
    assert ledger.keep_receipt(witness_of(entry, WITNESS)) is None  # twice: kept once
    not_held = ledger.keep_receipt(witness_of(other, WITNESS))
    wrong_node = ledger.keep_receipt(
        sign_receipt(node="bank", seq=1, head_hash=entry.hash, witness=WITNESS)
    )
    unsigned = witness_of(entry, WITNESS)
    tampered = Receipt(**{**unsigned.to_dict(), "witness": NodeKey.generate().public_key_text()})

    assert not_held is not None and "does not hold" in not_held
    assert wrong_node is not None and "for node 'bank'" in wrong_node
    assert "not signed by the key it names" in (ledger.keep_receipt(tampered) or "")
    with transaction(ledger.engine) as session:
        kept = ledger_receipts(session, NODE)
    assert [(r.seq, r.head_hash) for r in kept] == [(1, entry.hash)]


def _fields(round_: int) -> dict:
    fields = round_fields(
        round_,
        run="run-a",
        round_=round_,
        data="sha256:" + "a" * 64,
        mode="dp",
        epsilon_round=0.5,
        epsilon_after=0.5 * round_,
    )
    fields.pop("node")
    return fields
