"""The ledger tables refuse UPDATE and DELETE, and a node's ledger only grows by its head."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from fedtune.client_node.node_ledger import NodeLedger
from fedtune.platform.ledger import seal_entry, sign_checkpoint
from fedtune.platform.ledger_store import LedgerConflictError, append_entries
from fedtune.platform.storage import transaction

FIELDS = {
    "run_id": "r",
    "round": 1,
    "base_model_fingerprint": "sha256:m",
    "data_fingerprint": "sha256:d",
    "mode": "dp",
    "steps": 3,
    "sample_rate": 0.1,
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "delta": 1e-5,
    "epsilon_round": 0.5,
    "epsilon_after": 0.5,
    "epsilon_cap": 8.0,
    "accountant": "rdp",
    "accountant_version": "opacus-test",
}


@pytest.fixture
def ledger(tmp_path):
    ledger = NodeLedger(tmp_path, node="hospital")
    ledger.append(FIELDS)
    return ledger


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET epsilon_after = 0.1",
        "DELETE FROM ledger_entries",
        "UPDATE ledger_checkpoints SET seq = 0",
        "DELETE FROM ledger_keys",
    ],
)
def test_the_database_refuses_to_change_or_delete_ledger_rows(ledger, statement):
    with pytest.raises(DatabaseError, match="append-only"), transaction(ledger.engine) as session:
        session.execute(text(statement))

    assert [e.epsilon_after for e in ledger.entries()] == [0.5]


def test_an_entry_that_does_not_extend_the_head_is_refused(ledger):
    stray = seal_entry({**FIELDS, "node": "hospital"}, previous=None, key=ledger.key)

    with (
        pytest.raises(LedgerConflictError, match="already holds entry 1"),
        transaction(ledger.engine) as session,
    ):
        append_entries(
            session,
            [stray],
            sign_checkpoint(node="hospital", head=stray, key=ledger.key),
            contiguous=True,
        )

    assert len(ledger.entries()) == 1


def test_the_ledger_survives_a_restart_and_keeps_chaining(ledger, tmp_path):
    reopened = NodeLedger(tmp_path, node="hospital")

    entry, checkpoint = reopened.append({**FIELDS, "round": 2, "epsilon_after": 0.8})

    first = reopened.entries()[0]
    assert (entry.seq, entry.prev_hash) == (2, first.hash)
    assert (checkpoint.seq, checkpoint.head_hash) == (2, entry.hash)
    assert reopened.key.public_key_text() == ledger.key.public_key_text()
