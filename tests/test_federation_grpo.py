"""A federated DP-GRPO run through Flower's Simulation Engine: two nodes sample, score and
train on their prompts; the coordinator's signed copies say DP-GRPO over prompts, each
node's ledger recomputes with the independent accountant, and the round's health holds
each node's mean reward, format share, completion length and KL. An A/B test then compares
the base and the run's adapter on the held-out prompts' reward, one node releasing under DP."""

import pytest
from sqlalchemy import select

from conftest import tiny_run_toml
from dashboard_data import open_page, texts
from fedtune.cli import main
from fedtune.common.database import transaction
from fedtune.coordinator.abtest import AbTestPlan, abtest_report
from fedtune.coordinator.versions import resolve_version
from fedtune.demo.verifiable import write_demo_prompts
from fedtune.platform.config import load_run_config
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import HealthSignal, Round, Run, open_database
from fedtune.platform.wire.messages import GRPO_METRICS
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.simulation import simulate, simulate_abtest

pytestmark = pytest.mark.simulation

GRPO_TRAINING = {
    "method": "grpo",
    "grpo_group_size": 2,
    "grpo_max_completion_tokens": 6,
    "grpo_rewards": ["answer_exact", "format"],
    "steps": 1,
    "batch_size": 4,
    "physical_batch_size": 2,
}


def grpo_nodes(**bank):
    return [
        {
            "name": name,
            "train": f"data/{name}/grpo_train.jsonl",
            "eval": f"data/{name}/grpo_held_out.jsonl",
            **(bank if name == "bank" else {}),
        }
        for name in ("hospital", "bank")
    ]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("grpo-run")
    for domain in ("hospital", "bank"):
        write_demo_prompts(tmp_path / "data", domain=domain, train=12, held_out=4)
    (tmp_path / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"name": "grpo", "rounds": 1},
            training=GRPO_TRAINING,
            nodes=grpo_nodes(),
        )
    )
    config = load_run_config(tmp_path / "run.toml")

    run_id = simulate(config, progress=lambda line: None)
    return tmp_path, config, run_id


def test_a_two_node_dp_grpo_round_writes_prompt_level_entries_and_reward_health(grpo_run):
    _, config, run_id = grpo_run
    engine = open_database(config.database_url)
    with transaction(engine) as session:
        assert session.get(Run, run_id).status == "finished"
        [round_] = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        records = privacy_records(session, run_id)
        health = session.scalars(select(HealthSignal).where(HealthSignal.run_id == run_id)).all()
    assert round_.updates_accepted == 2 and round_.held_out_loss is not None
    assert all(r.signed and r.mode == "dp" for r in records)
    assert {(r.method, r.privacy_unit) for r in records} == {("dp-grpo-seeded-noise", "prompt")}
    figures = {(h.signal, h.node_name): h.value for h in health if h.signal in GRPO_METRICS}
    for name in ("hospital", "bank"):
        assert 0 < figures["grpo-completion-tokens", name] <= 6
        assert 0 <= figures["grpo-format-share", name] <= 1
        assert figures["grpo-kl", name] >= 0
        assert ("grpo-mean-reward", name) in figures
        entries = NodeLedger(config.node_config(name).node.state_dir, node=name).entries()
        assert [check.agrees for check in recompute_ledger([e.to_dict() for e in entries])] == [
            True
        ]


def test_an_ab_test_compares_the_held_out_reward_with_its_test_and_interval(
    grpo_run, tiny_model_dir, monkeypatch, capsys
):
    """Per held-out prompt, the greedy completion's reward under each node's two rewards
    (0 to 2): the hospital shares per-prompt scores (Wilcoxon signed-rank, paired bootstrap
    interval), the bank releases paired sums under DP, its rewards clipped to [0, 2]."""
    tmp_path, config, _ = grpo_run
    document = tiny_run_toml(
        tiny_model_dir,
        run={"name": "grpo", "rounds": 1},
        training=GRPO_TRAINING,
        # Little noise (and a cap it fits under): 4 held-out prompts a node are few for a
        # DP count to stay at 2 or more.
        privacy={"metric_noise_multiplier": 0.2, "target_epsilon": 1000.0},
        nodes=grpo_nodes(release_metrics="dp"),
    )
    (tmp_path / "run-ab.toml").write_text(document)
    ab_config = load_run_config(tmp_path / "run-ab.toml")
    assert ab_config.database_url == config.database_url  # the same coordinator and nodes
    engine = open_database(config.database_url)
    latest = resolve_version(engine, "latest")
    plan = AbTestPlan(
        version_a=resolve_version(engine, "base"),
        version_b=latest,
        base_model_fingerprint=latest.base_model_fingerprint,
        metrics=("reward", "loss"),
        max_examples=4,
    )
    replies, said = {}, []

    test_id = simulate_abtest(
        ab_config,
        plan,
        progress=said.append,
        on_reply=lambda m: replies.update({m.content.config_records["node"]["name"]: m}),
    )

    report = abtest_report(engine, test_id)
    assert report["status"] == "finished", report["error"]
    tests = {(r["scope"], r["metric"]): r for r in report["results"]}
    assert report["nodes"]["answered"] == ["bank", "hospital"], said  # stored sorted
    hospital, bank = tests[("hospital", "reward")], tests[("bank", "reward")]
    assert hospital["test"] == "Wilcoxon signed-rank + paired bootstrap CI"
    assert hospital["examples"] == 4 and hospital["ci_low"] <= hospital["ci_high"]
    assert 0.0 <= hospital["mean_a"] <= 2.0 and 0.0 <= hospital["mean_b"] <= 2.0
    assert bank["test"] == "paired t-test (DP)" and bank["ci_low"] < bank["ci_high"]
    overall = tests[("overall", "reward")]
    assert overall["test"] == "paired t-test (DP)" and overall["ci_low"] < overall["ci_high"]
    sent = replies["hospital"].content.metric_records["scores"]
    assert len(sent["reward/a"]) == len(sent["loss/a"]) == 4  # one row per prompt
    assert all(0.0 <= r <= 2.0 for r in sent["reward/a"] + sent["reward/b"])
    released = replies["bank"].content.metric_records["scores"]
    privacy = ab_config.node_config("bank").privacy
    # One Gaussian mechanism on rows scaled to [0, 1]: each sum's noise is the same up to
    # the metric's width, the reward's [0, 2] (two rewards) against the loss's bound.
    width = released["reward/noise-sd"] / released["loss/noise-sd"] * privacy.metric_loss_bound
    assert width == pytest.approx(2.0)

    assert main(["abtest", "show", test_id, "--db", config.database_url]) == 0
    shown = capsys.readouterr().out
    assert "overall      reward" in shown and "Wilcoxon signed-rank" in shown
    page = open_page(config.database_url, "views/ab_tests.py", monkeypatch)
    assert "**reward** (higher is better)" in texts(page)
    assert "greedy completion's summed verifiable reward" in texts(page)
