"""A federated DP-GRPO run through Flower's Simulation Engine: two nodes sample, score and
train on their prompts; the coordinator's signed copies say DP-GRPO over prompts, each
node's ledger recomputes with the independent accountant, and the round's health holds
each node's mean reward, format share, completion length and KL."""

import pytest
from sqlalchemy import select

from conftest import tiny_run_toml
from fedtune.common.database import transaction
from fedtune.demo.verifiable import write_demo_prompts
from fedtune.platform.config import load_run_config
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import HealthSignal, Round, Run, open_database
from fedtune.platform.wire.messages import GRPO_METRICS
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.simulation import simulate

pytestmark = pytest.mark.simulation


def test_a_two_node_dp_grpo_round_writes_prompt_level_entries_and_reward_health(
    tmp_path, tiny_model_dir
):
    for domain in ("hospital", "bank"):
        write_demo_prompts(tmp_path / "data", domain=domain, train=12, held_out=4)
    (tmp_path / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"name": "grpo", "rounds": 1},
            training={
                "method": "grpo",
                "grpo_group_size": 2,
                "grpo_max_completion_tokens": 6,
                "grpo_rewards": ["answer_exact", "format"],
                "steps": 1,
                "batch_size": 4,
                "physical_batch_size": 2,
            },
            nodes=[
                {
                    "name": name,
                    "train": f"data/{name}/grpo_train.jsonl",
                    "eval": f"data/{name}/grpo_held_out.jsonl",
                }
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
