"""The real default model (SmolLM2-135M-Instruct, fetched from PyPI on first use)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.demo.data import write_demo_data
from fedtune.platform.model.model_store import resolve_model_dir

pytestmark = pytest.mark.integration

CONFIG = """
[node]
name = "hospital"
state_dir = "state"

[data]
train = "data/hospital/train.jsonl"
eval = "data/hospital/held_out.jsonl"
max_eval_examples = 16

[training]
steps = 2
batch_size = 16
physical_batch_size = 8

[privacy]
target_epsilon = 8.0
delta = 1e-5
planned_rounds = 10

[output]
dir = "out"
"""


def test_a_few_dp_steps_on_the_demo_hospital_data(tmp_path):
    write_demo_data(tmp_path / "data", domain="hospital", train=200, held_out=16)
    (tmp_path / "node.toml").write_text(CONFIG)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "node",
            "train",
            "--config",
            "node.toml",
            "--no-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    (metrics_path,) = (tmp_path / "out").glob("*/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["privacy"]["mode"] == "dp"
    assert 0 < metrics["privacy"]["epsilon_after"] < 8.0
    assert math.isfinite(metrics["held_out"]["after"]["loss"])
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("smollm2-135m"))
    adapted = PeftModel.from_pretrained(base, metrics["adapter_dir"])
    with torch.no_grad():
        logits = adapted(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
