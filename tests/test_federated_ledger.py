"""The epsilon ledger in a federated run: a node that reaches its cap declines from then on,
the run goes on with the others, the node's ledger and the coordinator's copy agree, and the
exported ledger verifies and its epsilons agree with an independent accountant."""

import json
import shutil
import sqlite3

import pytest
from sqlalchemy import select

from conftest import FEDERATED_BANK_CAP, FederatedRun
from fedtune.cli import main
from fedtune.common.database import transaction
from fedtune.platform.db.storage import RejectedUpdate, Round, open_database
from fedtune.privacy.ledger_store import ledger_entries, ledger_receipts
from fedtune.privacy.node_ledger import NodeLedger, ledger_url
from fedtune.privacy.signing import NodeKey

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def run(federated_run: FederatedRun):
    engine = open_database(federated_run.url, create=False)
    yield federated_run.workdir, federated_run.config, federated_run.run_id, engine
    engine.dispose()


def test_a_node_at_its_cap_declines_from_then_on_and_the_run_goes_on(run):
    _, _, run_id, engine = run
    with transaction(engine) as session:
        rounds = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        declines = session.scalars(
            select(RejectedUpdate).where(RejectedUpdate.node_name == "bank")
        ).all()
        copies = ledger_entries(session, "bank")

    assert [r.number for r in rounds] == [1, 2]
    assert all(r.updates_accepted >= 1 for r in rounds)  # the hospital trained every round
    declined_rounds = sorted(d.round for d in declines if d.kind == "declined")
    assert declined_rounds and declined_rounds == list(range(declined_rounds[0], 3))
    assert all(
        f"past its cap {FEDERATED_BANK_CAP:g}" in d.reason for d in declines if d.kind == "declined"
    )
    assert len(copies) == declined_rounds[0] - 1 >= 1
    assert all(e.epsilon_after <= FEDERATED_BANK_CAP for e in copies)


def test_node_ledgers_and_the_coordinators_copies_agree(run):
    _, config, _, engine = run
    for name in ("hospital", "bank"):
        state_dir = config.node_config(name).node.state_dir
        own = NodeLedger(state_dir, node=name).entries()
        with transaction(engine) as session:
            copies = ledger_entries(session, name)
        assert own and [e.to_dict() for e in own] == [e.to_dict() for e in copies], name


def test_exported_ledger_verifies_and_recomputes_independently(run, tmp_path, capsys):
    _, config, _, _ = run
    state_dir = config.node_config("hospital").node.state_dir
    ledger = tmp_path / "hospital.jsonl"
    report = tmp_path / "hospital.html"

    exported = main(
        [
            "audit",
            "export",
            "--db",
            ledger_url(state_dir),
            "--node",
            "hospital",
            "--out",
            str(ledger),
        ]
    )
    header = json.loads(ledger.read_text().splitlines()[0])
    verified = main(["audit", "verify", str(ledger), "--public-key", header["public_key"]])
    reported = main(
        ["audit", "report", str(ledger), "--out", str(report), "--public-key", header["public_key"]]
    )

    out = capsys.readouterr().out
    assert (exported, verified, reported) == (0, 0, 0)
    assert "VERIFIED" in out and "2 of 2 private entries agree" in out
    assert "Ledger verified" in report.read_text()


def test_a_ledger_edited_in_the_database_file_fails_verification(run, tmp_path, capsys):
    workdir, _, _, _ = run
    ledger = tmp_path / "bank.jsonl"
    assert (
        main(
            [
                "audit",
                "export",
                "--db",
                str(workdir / "out" / "fedtune.db"),
                "--node",
                "bank",
                "--out",
                str(ledger),
            ]
        )
        == 0
    )
    lines = ledger.read_text().splitlines()
    key = json.loads(lines[0])["public_key"]
    entry = json.loads(lines[1])
    entry["epsilon_after"] = entry["epsilon_after"] / 2
    lines[1] = json.dumps(entry)
    ledger.write_text("\n".join(lines) + "\n")

    code = main(["audit", "verify", str(ledger), "--public-key", key])

    assert code == 1
    assert "entry seq 1" in capsys.readouterr().out


def test_each_node_keeps_the_coordinators_receipt_for_every_head_it_sent(run):
    _, config, _, engine = run
    for name in ("hospital", "bank"):
        state_dir = config.node_config(name).node.state_dir
        node = NodeLedger(state_dir, node=name)
        with transaction(node.engine) as session:
            kept = ledger_receipts(session, name)
        with transaction(engine) as session:
            signed = ledger_receipts(session, name)
        witness = NodeKey.load(config.witness_key_path).public_key
        assert [(r.seq, r.head_hash) for r in kept] == [(e.seq, e.hash) for e in node.entries()]
        assert kept == signed, name
        assert all(r.signed_by(witness) for r in kept)


def _export(db: str, node: str, out) -> str:
    assert main(["audit", "export", "--db", db, "--node", node, "--out", str(out)]) == 0
    return json.loads(out.read_text().splitlines()[0])["public_key"]


def _rolled_back_copy(state_dir, tmp_path, *, keep_receipts: bool):
    """The node's ledger.db with its last entry and checkpoint deleted (triggers dropped),
    as an operator with file access could do; the receipts too unless ``keep_receipts``."""
    copy = tmp_path / "ledger.db"
    shutil.copy(state_dir / "ledger.db", copy)
    with sqlite3.connect(copy) as db:
        for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            db.execute(f"DROP TRIGGER {trigger}")
        last = db.execute("SELECT max(seq) FROM ledger_entries").fetchone()[0]
        db.execute("DELETE FROM ledger_entries WHERE seq = ?", (last,))
        db.execute("DELETE FROM ledger_checkpoints WHERE seq = ?", (last,))
        if not keep_receipts:
            db.execute("DELETE FROM ledger_receipts WHERE seq = ?", (last,))
    return f"sqlite:///{copy}", last


def test_a_rolled_back_node_ledger_fails_given_the_witness_key_or_the_coordinators_copy(
    run, tmp_path, capsys
):
    workdir, config, _, _ = run
    state_dir = config.node_config("hospital").node.state_dir
    witness = NodeKey.load(config.witness_key_path).public_key_text()
    coordinator_copy = tmp_path / "coordinator.jsonl"
    _export(str(workdir / "out" / "fedtune.db"), "hospital", coordinator_copy)
    honest = tmp_path / "honest.jsonl"
    key = _export(ledger_url(state_dir), "hospital", honest)
    (tmp_path / "swap").mkdir()
    (tmp_path / "rewrite").mkdir()
    swapped_db, last = _rolled_back_copy(state_dir, tmp_path / "swap", keep_receipts=True)
    rewritten_db, _ = _rolled_back_copy(state_dir, tmp_path / "rewrite", keep_receipts=False)
    swapped, rewritten = tmp_path / "swapped.jsonl", tmp_path / "rewritten.jsonl"
    _export(swapped_db, "hospital", swapped)
    _export(rewritten_db, "hospital", rewritten)
    capsys.readouterr()

    def verify(path, *options: str) -> tuple[int, str]:
        code = main(["audit", "verify", str(path), "--public-key", key, *options])
        return code, capsys.readouterr().out

    with_witness = ("--witness-key", witness)
    with_copy = ("--coordinator-copy", str(coordinator_copy))
    honest_code, honest_out = verify(honest, *with_witness, *with_copy)
    assert honest_code == 0, honest_out
    assert f"witnessed by the coordinator up to seq {last}" in honest_out
    assert verify(swapped)[0] == 0  # alone, a prefix of a signed ledger looks whole
    code, out = verify(swapped, *with_witness)
    assert code == 1 and f"rolled back: the coordinator witnessed seq {last}" in out
    assert verify(rewritten, *with_witness)[0] == 0  # the receipt went with the entry...
    code, out = verify(rewritten, *with_copy)  # ...but the coordinator kept its copy
    assert code == 1 and f"rolled back: the coordinator's copy holds seq {last}" in out
