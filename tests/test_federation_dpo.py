"""A federated DP-DPO run through Flower's Simulation Engine: two nodes train their
preference pairs; the coordinator's signed copies say DP-DPO over preference pairs, and each
node's exported ledger verifies and recomputes with the independent accountant. Model health
holds the held-out preference accuracy and margin, and an A/B test compares them."""

import json

import pytest
from sqlalchemy import select

from conftest import tiny_run_toml
from fedtune.cli import main
from fedtune.common.database import transaction
from fedtune.coordinator.abtest import AbTestPlan, abtest_report
from fedtune.coordinator.versions import resolve_version
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.config import load_run_config
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import HealthSignal, NodeMetric, Round, Run, open_database
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.node_ledger import NodeLedger, ledger_url
from fedtune.simulation import simulate, simulate_abtest

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("dpo-run")
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
    return tmp_path, config, run_id


def test_a_two_node_dp_dpo_run_completes_with_verifiable_pair_level_ledgers(dpo_run, capsys):
    tmp_path, config, run_id = dpo_run
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


def test_health_holds_each_rounds_preference_accuracy_and_margin_per_node_and_global(dpo_run):
    _, config, run_id = dpo_run
    engine = open_database(config.database_url)
    with transaction(engine) as session:
        signals = session.scalars(
            select(HealthSignal).where(
                HealthSignal.run_id == run_id,
                HealthSignal.signal.in_(["preference-accuracy", "reward-margin"]),
            )
        ).all()
        evaluated = session.scalars(
            select(NodeMetric).where(NodeMetric.run_id == run_id, NodeMetric.phase == "evaluate")
        ).all()

    kept = {(s.signal, s.node_name) for s in signals}
    assert kept == {
        (signal, node)
        for signal in ("preference-accuracy", "reward-margin")
        for node in (None, "hospital", "bank")
    }
    assert all(0.0 <= s.value <= 1.0 for s in signals if s.signal == "preference-accuracy")
    assert [m.metrics["held-out-pairs"] for m in evaluated] == [4, 4]


def test_an_ab_test_compares_preference_accuracy_by_mcnemar_and_margin_by_wilcoxon(dpo_run):
    _, config, _ = dpo_run
    engine = open_database(config.database_url)
    latest = resolve_version(engine, "latest")
    plan = AbTestPlan(
        version_a=resolve_version(engine, "base"),
        version_b=latest,
        base_model_fingerprint=latest.base_model_fingerprint,
        metrics=("preference-accuracy", "reward-margin"),
        max_examples=4,
        dpo_beta=0.2,
    )

    test_id = simulate_abtest(config, plan, progress=lambda line: None)

    report = abtest_report(engine, test_id)
    assert report["status"] == "finished"
    tests = {(r["scope"], r["metric"]): r for r in report["results"]}
    assert set(tests) == {
        (scope, metric)
        for scope in ("overall", "hospital", "bank")
        for metric in ("preference-accuracy", "reward-margin")
    }
    overall = tests[("overall", "preference-accuracy")]
    assert overall["test"] == "McNemar exact" and overall["examples"] == 8
    assert overall["mean_a"] == 0.0  # the base model is its own reference
    assert tests[("overall", "reward-margin")]["test"].startswith("Wilcoxon signed-rank")
