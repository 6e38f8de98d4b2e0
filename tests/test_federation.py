"""A whole federated run through Flower's Simulation Engine on tiny models: two nodes that
share the base model train together; a third with another base model is refused."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from sqlalchemy import select
from transformers import AutoModelForCausalLM

from conftest import build_tiny_model, tiny_run_toml
from fedtune.common.database import transaction
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import load_run_config
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import (
    AdapterCheckpoint,
    NodeMetric,
    RejectedUpdate,
    Round,
    Run,
    open_database,
)
from fedtune.simulation import simulate

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    workdir = tmp_path_factory.mktemp("federation")
    other = workdir / "other-model"
    build_tiny_model(len(tiny_tokenizer), seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    write_demo_data(workdir / "data", domain="hospital", train=64, held_out=8)
    write_demo_data(workdir / "data", domain="bank", train=48, held_out=8)
    (workdir / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"name": "test"},
            training={"learning_rate": 0.02},
            nodes=[
                {"name": "hospital"},
                {"name": "bank", "target_epsilon": 4.0},
                {"name": "outsider", "domain": "bank", "model": str(other)},
            ],
        )
    )
    config = load_run_config(workdir / "run.toml")
    lines: list[str] = []
    run_id = simulate(config, progress=lines.append)
    return config, run_id, open_database(config.database_url), lines


def rows(engine, table, run_id):
    with transaction(engine) as session:
        return session.scalars(select(table).where(table.run_id == run_id)).all()


def test_run_rounds_and_checkpoints_are_stored(run):
    config, run_id, engine, lines = run
    with transaction(engine) as session:
        stored = session.get(Run, run_id)
        assert stored.status == "finished" and stored.rounds_planned == 2
    rounds = rows(engine, Round, run_id)
    assert [r.number for r in rounds] == [1, 2]
    assert all(r.updates_accepted == 2 and r.updates_rejected == 1 for r in rounds)
    assert all(r.held_out_loss is not None for r in rounds)
    checkpoints = sorted(rows(engine, AdapterCheckpoint, run_id), key=lambda c: c.round)
    assert [Path(c.path) for c in checkpoints] == [
        config.output.dir / "adapters" / f"round-{n}" for n in (1, 2)
    ]
    assert any("round 2/2" in line for line in lines)


def test_every_node_that_trained_reports_metrics_and_epsilon(run):
    _, run_id, engine, _ = run
    metrics = rows(engine, NodeMetric, run_id)
    for phase in ("train", "evaluate"):
        names = sorted(m.node_name for m in metrics if m.phase == phase)
        assert names == ["bank", "bank", "hospital", "hospital"], phase
    with transaction(engine) as session:
        records = privacy_records(session, run_id)  # the coordinator's signed ledger copies
    by_node = {
        name: [r.epsilon_after for r in records if r.node == name] for name in ("bank", "hospital")
    }
    assert by_node["hospital"][0] < by_node["hospital"][1] <= 8.0 * 1.001
    assert by_node["bank"][0] < by_node["bank"][1] <= 4.0 * 1.001  # the node's own target
    assert all(r.signed and r.accountant == "rdp" and r.delta == 1e-5 for r in records)


def test_a_node_with_another_base_model_is_refused_with_a_clear_reason(run):
    _, run_id, engine, _ = run
    refused = rows(engine, RejectedUpdate, run_id)
    assert {(r.round, r.phase) for r in refused} == {
        (1, "train"),
        (1, "evaluate"),
        (2, "train"),
        (2, "evaluate"),
    }
    assert all(r.kind == "failed" for r in refused)
    assert all("node outsider refuses the round" in r.reason for r in refused)
    assert all("this node holds sha256:" in r.reason for r in refused)


def test_final_adapter_loads_with_plain_peft_and_differs_from_the_initial_one(run, tiny_model_dir):
    config, _, _, _ = run
    final = config.output.dir / "adapters" / "round-2"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        base_logits = base(input_ids).logits

    model = PeftModel.from_pretrained(base, final)
    with torch.no_grad():
        tuned_logits = model(input_ids).logits

    weights = load_file(final / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(w) > 0 for w in lora_b)  # initial B is zero
    assert not torch.allclose(base_logits, tuned_logits)
    round_1 = load_file(config.output.dir / "adapters" / "round-1" / "adapter_model.safetensors")
    assert any(not torch.equal(round_1[name], weights[name]) for name in weights)
