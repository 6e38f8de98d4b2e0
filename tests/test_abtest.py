"""A federated A/B test in simulation on a tiny model: a stored result per node and overall,
and nothing of the nodes' held-out text in what the coordinator receives."""

import json

import pytest
from sqlalchemy import select

from conftest import tiny_run_toml
from fedtune.cli import main
from fedtune.client_node.data import load_conversations
from fedtune.common.database import transaction
from fedtune.coordinator.abtest import AbTestPlan, abtest_report
from fedtune.coordinator.versions import (
    list_versions,
    production_version,
    promote,
    resolve_version,
)
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import load_run_config
from fedtune.platform.db.storage import AbTest, AbTestResult, open_database
from fedtune.simulation import simulate, simulate_abtest

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def tested(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("abtest")
    write_demo_data(workdir / "data", domain="hospital", train=32, held_out=8)
    write_demo_data(workdir / "data", domain="bank", train=32, held_out=8)
    (workdir / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"rounds": 1, "ab_test_against_production": True},
            training={"learning_rate": 0.05},
            privacy={"mode": "non-private", "allow_non_private_updates": True},
            nodes=[{"name": "hospital"}, {"name": "bank", "share_per_example_scores": False}],
        )
    )
    config = load_run_config(workdir / "run.toml")
    engine = open_database(config.database_url)
    promote(engine, resolve_version(engine, "base"), by="test")
    simulate(config, progress=lambda line: None)
    final = resolve_version(engine, "latest")
    plan = AbTestPlan(
        version_a=resolve_version(engine, "base"),
        version_b=final,
        base_model_fingerprint=final.base_model_fingerprint,
        metrics=("loss", "rouge-l", "exact-match"),
        max_examples=6,
        max_new_tokens=8,
    )
    replies = []
    test_id = simulate_abtest(
        config, plan, progress=lambda line: None, on_reply=lambda m: replies.append(m)
    )
    return workdir, config, engine, test_id, replies


def test_the_result_is_stored_per_node_and_overall_with_a_verdict(tested):
    _, _, engine, test_id, _ = tested

    report = abtest_report(engine, test_id)

    assert report["status"] == "finished"
    scopes = {(r["scope"], r["metric"]) for r in report["results"]}
    assert scopes == {
        (scope, metric)
        for scope in ("hospital", "bank", "overall")
        for metric in ("loss", "rouge-l", "exact-match")
    }
    for result in report["results"]:
        assert result["verdict"] in ("b better", "a better", "no significant difference")
        assert result["examples"] == (12 if result["scope"] == "overall" else 6)
    loss = next(r for r in report["results"] if (r["scope"], r["metric"]) == ("overall", "loss"))
    assert loss["ci_low"] <= loss["difference"] <= loss["ci_high"]
    assert loss["p_adjusted"] >= loss["p_value"]


def test_a_run_can_end_with_an_ab_test_of_its_final_adapter_against_production(tested):
    _, _, engine, _, _ = tested
    with transaction(engine) as session:
        automatic = session.scalars(select(AbTest).where(AbTest.run_id.is_not(None))).one()

    assert (automatic.version_a, automatic.status) == ("base", "finished")
    assert automatic.version_b.endswith("/1") and automatic.metrics["names"] == ["loss"]


def test_a_node_that_shares_only_statistics_gets_a_paired_t_test(tested):
    _, _, engine, test_id, _ = tested
    with transaction(engine) as session:
        rows = session.scalars(
            select(AbTestResult).where(
                AbTestResult.test_id == test_id, AbTestResult.scope == "bank"
            )
        ).all()

    tests = {row.metric: row.test for row in rows}
    assert "t-test" in tests["rouge-l"] and "McNemar" in tests["exact-match"]


def test_no_held_out_text_reaches_the_coordinator(tested):
    workdir, _, _, _, replies = tested
    texts = [
        message["content"]
        for domain in ("hospital", "bank")
        for conversation in load_conversations(workdir / "data" / domain / "held_out.jsonl")
        for message in conversation
    ]
    assert len(replies) == 2
    for reply in replies:
        content = reply.content
        seen = json.dumps(
            {
                "configs": {k: dict(v) for k, v in content.config_records.items()},
                "metrics": {k: dict(v) for k, v in content.metric_records.items()},
            },
            default=str,
        )
        assert not content.array_records
        for text in texts:
            assert text not in seen
        assert all(
            isinstance(v, (int, float, list)) for v in content.metric_records["scores"].values()
        )


def test_versions_can_be_listed_and_promoted_with_who_and_when(tested, capsys):
    _, config, engine, _, _ = tested
    db = config.database_url
    final = list_versions(engine)[-1]

    assert main(["model", "promote", final.id, "--db", db, "--by", "ada@consortium"]) == 0
    assert main(["model", "list", "--db", db]) == 0

    out = capsys.readouterr().out
    assert production_version(engine) == final.id
    assert f"{final.id}" in out and "in production" in out
    assert main(["model", "promote", "no-such-version", "--db", db, "--by", "x"]) == 2
