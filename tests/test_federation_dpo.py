"""A federated DP-DPO run through Flower's Simulation Engine: two nodes train their
preference pairs; the coordinator's signed copies say DP-DPO over preference pairs, and each
node's exported ledger verifies and recomputes with the independent accountant."""

import json

import pytest
from sqlalchemy import select

from conftest import tiny_run_toml
from fedtune.cli import main
from fedtune.common.database import transaction
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.config import load_run_config
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import Round, Run, open_database
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.node_ledger import NodeLedger, ledger_url
from fedtune.simulation import simulate

pytestmark = pytest.mark.simulation


def test_a_two_node_dp_dpo_run_completes_with_verifiable_pair_level_ledgers(
    tmp_path, tiny_model_dir, capsys
):
    for domain in ("hospital", "bank"):
        write_demo_preferences(tmp_path / "data", domain=domain, train=24, held_out=4)
    preferences = {
        "train": "data/{}/preferences_train.jsonl",
        "eval": "data/{}/preferences_held_out.jsonl",
    }
    (tmp_path / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"name": "dpo", "rounds": 1},
            training={"method": "dpo", "dpo_beta": 0.2, "batch_size": 8, "physical_batch_size": 4},
            nodes=[
                {"name": name, **{k: v.format(name) for k, v in preferences.items()}}
                for name in ("hospital", "bank")
            ],
        )
    )
    config = load_run_config(tmp_path / "run.toml")

    run_id = simulate(config, progress=lambda line: None)

    engine = open_database(config.database_url)
    with transaction(engine) as session:
        assert session.get(Run, run_id).status == "finished"
        [round_] = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        records = privacy_records(session, run_id)
    assert round_.updates_accepted == 2 and round_.held_out_loss is not None
    assert sorted(r.node for r in records) == ["bank", "hospital"]
    assert all(r.signed and r.mode == "dp" for r in records)
    assert {(r.method, r.privacy_unit) for r in records} == {
        ("dp-dpo-seeded-noise", "preference_pair")
    }
    for name in ("hospital", "bank"):
        exported = tmp_path / f"{name}.jsonl"
        state_dir = config.node_config(name).node.state_dir
        assert (
            main(
                [
                    "audit",
                    "export",
                    "--db",
                    ledger_url(state_dir),
                    "--node",
                    name,
                    "--out",
                    str(exported),
                ]
            )
            == 0
        )
        key = json.loads(exported.read_text().splitlines()[0])["public_key"]
        assert main(["audit", "verify", str(exported), "--public-key", key]) == 0
        assert "VERIFIED" in capsys.readouterr().out
        entries = NodeLedger(state_dir, node=name).entries()
        assert [check.agrees for check in recompute_ledger([e.to_dict() for e in entries])] == [
            True
        ]
