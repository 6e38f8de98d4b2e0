"""privacy.release_metrics in a federated run: a "dp" node releases its held-out loss through
the Gaussian mechanism, accounted in its ledger on the held-out data set; a "none" node sends
no metric; both still train and count; the coordinator aggregates what it gets."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from conftest import tiny_run_toml
from fedtune.client_node.metric_policy import DP_EVALUATE_METRICS
from fedtune.common.database import transaction
from fedtune.coordinator.abtest import AbTestPlan
from fedtune.coordinator.versions import resolve_version
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import load_run_config
from fedtune.platform.db.storage import (
    AbTestResult,
    NodeMetric,
    RejectedUpdate,
    Round,
    open_database,
)
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.wire.messages import NUM_EXAMPLES
from fedtune.privacy.ledger_copies import check_copy
from fedtune.privacy.ledger_store import ledger_entries
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.simulation import simulate, simulate_abtest

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("release-policy")
    write_demo_data(workdir / "data", domain="hospital", train=32, held_out=8)
    write_demo_data(workdir / "data", domain="bank", train=32, held_out=8)
    (workdir / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"name": "release-policy"},
            nodes=[
                {"name": "hospital", "release_metrics": "dp"},
                {"name": "bank", "release_metrics": "none"},
            ],
        )
    )
    config = load_run_config(workdir / "run.toml")
    run_id = simulate(config, progress=lambda line: None)
    engine = open_database(config.database_url, create=False)
    final = resolve_version(engine, "latest")
    plan = AbTestPlan(
        version_a=resolve_version(engine, "base"),
        version_b=final,
        base_model_fingerprint=final.base_model_fingerprint or "",
        metrics=("loss", "exact-match"),
        max_examples=6,
        max_new_tokens=4,
    )
    lines: list[str] = []
    test_id = simulate_abtest(config, plan, progress=lines.append)
    with transaction(engine) as session:
        metrics = session.scalars(select(NodeMetric).where(NodeMetric.run_id == run_id)).all()
        rejected = session.scalars(
            select(RejectedUpdate).where(RejectedUpdate.run_id == run_id)
        ).all()
        rounds = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        rows = [(m.node_name, m.phase, dict(m.metrics)) for m in metrics]
        rejections = [(r.node_name, r.phase, r.kind, r.reason) for r in rejected]
        held_out = [(r.number, r.updates_accepted, r.held_out_loss) for r in rounds]
        results = session.scalars(select(AbTestResult).where(AbTestResult.test_id == test_id))
        ab = [(r.scope, r.metric, r.test, r.examples) for r in results]
    engine.dispose()
    yield config, rows, rejections, held_out, (test_id, ab, lines)


def test_both_nodes_train_and_send_only_the_updates_weight(policy_run):
    _, rows, rejections, rounds, _ = policy_run
    train = [(name, metrics) for name, phase, metrics in rows if phase == "train"]

    assert sorted(name for name, _ in train) == ["bank", "bank", "hospital", "hospital"]
    assert all(set(metrics) == {NUM_EXAMPLES} for _, metrics in train)
    assert [accepted for _, accepted, _ in rounds] == [2, 2]
    assert not [r for r in rejections if r[1] == "train"]


def test_a_dp_node_releases_its_held_out_loss_and_a_none_node_nothing(policy_run):
    _, rows, rejections, rounds, _ = policy_run
    evaluated = {(name, tuple(sorted(m))) for name, phase, m in rows if phase == "evaluate"}

    assert evaluated == {("hospital", tuple(sorted(DP_EVALUATE_METRICS)))}
    bank = [r for r in rejections if r[0] == "bank" and r[1] == "evaluate"]
    assert [r[2] for r in bank] == ["declined", "declined"]
    assert "released no evaluation metrics" in bank[0][3]
    assert all(loss is not None for _, _, loss in rounds)  # the hospital's DP figure


def test_the_releases_are_in_the_dp_nodes_ledger_on_its_held_out_data(policy_run):
    config, *_ = policy_run
    node = config.node_config("hospital")
    entries = NodeLedger(node.node.state_dir, node="hospital").entries()
    releases = [e for e in entries if e.entry_kind == "metric_release"]
    held_out = file_fingerprint(node.data.eval)

    run_id = entries[0].run_id  # the training run's (the A/B test's release comes last)
    assert [(e.run_id, e.round) for e in releases[:2]] == [(run_id, 1), (run_id, 2)]
    assert {e.data_fingerprint for e in releases} == {held_out}
    assert [e.epsilon_after for e in releases] == sorted(e.epsilon_after for e in releases)
    assert len(entries) == 5  # two training rounds, two held-out releases, one A/B release
    bank = config.node_config("bank")
    bank_entries = NodeLedger(bank.node.state_dir, node="bank").entries()
    assert [e.entry_kind for e in bank_entries] == ["training_round", "training_round"]


def test_the_coordinator_holds_the_releases_and_the_copy_verifies(policy_run):
    config, *_ = policy_run
    engine = open_database(config.database_url, create=False)
    node = config.node_config("hospital")
    try:
        with transaction(engine) as session:
            copies = ledger_entries(session, "hospital")
        verdict = check_copy(engine, "hospital")
    finally:
        engine.dispose()

    own = NodeLedger(node.node.state_dir, node="hospital").entries()
    assert [e.to_dict() for e in copies] == [e.to_dict() for e in own]
    assert verdict.ok, verdict.message


def test_a_dp_node_answers_an_ab_test_with_noisy_statistics_and_a_none_node_declines(policy_run):
    config, *_, (test_id, ab, lines) = policy_run
    node = config.node_config("hospital")
    releases = [
        e
        for e in NodeLedger(node.node.state_dir, node="hospital").entries()
        if e.entry_kind == "metric_release" and e.run_id == test_id
    ]

    assert {(scope, metric, test) for scope, metric, test, _ in ab} == {
        (scope, metric, "paired t-test (DP)")
        for scope in ("hospital", "overall")
        for metric in ("loss", "exact-match")
    }
    assert any("bank declined" in line and "releases no metrics" in line for line in lines)
    assert len(releases) == 1 and releases[0].round == 0
