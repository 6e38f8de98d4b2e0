"""`fedtune node train` with training.method = "dpo", end to end on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.demo.data import write_demo_data
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.node_ledger import NodeLedger

pytestmark = pytest.mark.e2e

CONFIG = """
[node]
name = "hospital"
state_dir = "state"

[model]
spec = "{model}"

[data]
train = "data/hospital/{train}"
eval = "data/hospital/preferences_held_out.jsonl"
max_length = 128
shares_budget_with = ["data/hospital/train.jsonl"]

[training]
method = "dpo"
dpo_beta = 0.2
steps = 2
batch_size = 8
physical_batch_size = 4

[privacy]
target_epsilon = 8.0

[output]
dir = "out"
"""


@pytest.fixture
def workdir(tmp_path):
    write_demo_data(tmp_path / "data", domain="hospital", train=32, held_out=4)
    write_demo_preferences(tmp_path / "data", domain="hospital", train=32, held_out=4)
    return tmp_path


def node_train(workdir: Path, model_dir: Path, *, train: str) -> subprocess.CompletedProcess:
    config = workdir / "node.toml"
    config.write_text(CONFIG.format(model=model_dir, train=train))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "node",
            "train",
            "--config",
            str(config),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_dpo_round_trains_records_a_preference_pair_entry_and_saves_a_peft_adapter(
    workdir, tiny_model_dir
):
    result = node_train(workdir, tiny_model_dir, train="preferences_train.jsonl")
    assert result.returncode == 0, result.stderr

    [metrics_file] = (workdir / "out").glob("*-dp/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    privacy = metrics["privacy"]
    assert (privacy["method"], privacy["privacy_unit"]) == ("dp-dpo", "preference_pair")
    assert (metrics["training"]["method"], metrics["training"]["dpo_beta"]) == ("dpo", 0.2)
    assert len(metrics["train_loss"]) == 2
    entries = NodeLedger(workdir / "state", node="hospital").entries()
    assert [e.data_fingerprint for e in entries] == [
        file_fingerprint(workdir / "data/hospital/preferences_train.jsonl")
    ]
    assert all(check.agrees for check in recompute_ledger([e.to_dict() for e in entries]))
    # Nothing spent yet on the SFT file of the same people: the group's epsilon is the round's.
    assert privacy["budget_group"]["epsilon_after"] == pytest.approx(privacy["epsilon_after"])
    assert "dp-dpo" in result.stdout and "privacy unit: one preference pair" in result.stdout
    assert "budget group (data.shares_budget_with) at epsilon" in result.stdout
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, metrics["adapter_dir"])
    with torch.no_grad():
        assert torch.isfinite(adapted(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_dpo_on_data_without_preference_pairs_is_refused_in_one_line(workdir, tiny_model_dir):
    result = node_train(workdir, tiny_model_dir, train="train.jsonl")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # above it: the model's loading bar
    assert "train.jsonl:1: not a preference pair" in last
    assert last.endswith('training.method = "dpo" needs rows {"prompt", "chosen", "rejected"}')
    assert (
        not (workdir / "state" / "ledger.db").exists()
        or not NodeLedger(workdir / "state", node="hospital").entries()
    )
