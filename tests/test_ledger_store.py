"""The ledger tables refuse UPDATE and DELETE (a node's ledger.db, and the coordinator's
database on SQLite and PostgreSQL), and a node's ledger only grows by its head."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from fedtune.common.database import transaction
from fedtune.platform.db.storage import open_database
from fedtune.privacy.ledger import seal_entry, sign_checkpoint
from fedtune.privacy.ledger_store import (
    LedgerConflictError,
    add_public_key,
    append_entries,
    ledger_entries,
    node_public_keys,
)
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.privacy.signing import NodeKey

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
    "kind": "training_round",
    "method": "dp-sgd",
    "privacy_unit": "example",
}


@pytest.fixture
def ledger(tmp_path):
    ledger = NodeLedger(tmp_path, node="hospital")
    ledger.append(FIELDS)
    return ledger


REFUSED = [
    "UPDATE ledger_entries SET epsilon_after = 0.1",
    "DELETE FROM ledger_entries",
    "UPDATE ledger_checkpoints SET seq = 0",
    "DELETE FROM ledger_keys",
]


@pytest.fixture
def coordinator(database_url):
    """The coordinator's database (migrated) holding a copy of one node's ledger: 2 entries."""
    engine = open_database(database_url)
    key = NodeKey.generate()
    first = seal_entry({**FIELDS, "node": "hospital"}, previous=None, key=key)
    second = seal_entry({**FIELDS, "node": "hospital", "round": 2}, previous=first, key=key)
    with transaction(engine) as session:
        add_public_key(session, "hospital", key.public_key_text())
        for entry in (first, second):
            checkpoint = sign_checkpoint(node="hospital", head=entry, key=key)
            append_entries(session, [entry], checkpoint, contiguous=False)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("statement", REFUSED)
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


@pytest.mark.parametrize("statement", [*REFUSED, "DELETE FROM ledger_checkpoints"])
def test_the_coordinators_database_refuses_to_change_or_delete_ledger_rows(coordinator, statement):
    with pytest.raises(DatabaseError, match="append-only"), transaction(coordinator) as session:
        session.execute(text(statement))

    with transaction(coordinator) as session:
        assert [e.seq for e in ledger_entries(session, "hospital")] == [1, 2]
        assert len(node_public_keys(session, "hospital")) == 1


def test_postgresql_refuses_truncate_too(postgres_url):
    engine = open_database(postgres_url)

    with pytest.raises(DatabaseError, match="ledger_keys is append-only"), engine.begin() as c:
        c.execute(text("TRUNCATE ledger_keys"))
    engine.dispose()


def test_a_replayed_copy_is_refused_by_the_coordinators_database(coordinator):
    with transaction(coordinator) as session:
        replay = ledger_entries(session, "hospital")[0]

    with (
        pytest.raises(LedgerConflictError, match="already holds entry 1"),
        transaction(coordinator) as session,
    ):
        append_entries(
            session,
            [replay],
            sign_checkpoint(node="hospital", head=replay, key=NodeKey.generate()),
            contiguous=False,
        )
