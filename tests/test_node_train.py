"""`fedtune node train` end to end on a tiny model, in separate processes."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.demo.data import write_demo_data
from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.node_ledger import NodeLedger

pytestmark = pytest.mark.e2e

CONFIG = """
[node]
name = "hospital"
state_dir = "state"

[model]
spec = "{model}"

[data]
train = "data/hospital/train.jsonl"
eval = "data/hospital/held_out.jsonl"
max_length = 160

[training]
steps = {steps}
batch_size = 16
physical_batch_size = 8
learning_rate = 0.01

[privacy]
mode = "{mode}"
target_epsilon = {target}
planned_rounds = 3

[output]
dir = "out"
"""


def node_train(workdir: Path, model_dir: Path, *, mode="dp", steps=3, target=8.0):
    config = workdir / f"node-{mode}.toml"
    config.write_text(CONFIG.format(model=model_dir, mode=mode, steps=steps, target=target))
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


def latest_metrics(workdir: Path, mode: str = "dp") -> dict:
    runs = sorted((workdir / "out").glob(f"*-{mode}*/metrics.json"))
    return json.loads(runs[-1].read_text())


@pytest.fixture
def workdir(tmp_path):
    write_demo_data(tmp_path / "data", domain="hospital", train=64, held_out=8)
    return tmp_path


@dataclass(frozen=True)
class TwoRounds:
    """A node that trained two DP rounds in two processes, and what each one printed."""

    workdir: Path
    epsilon_1: float
    second: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_model_dir) -> TwoRounds:
    """Shared: each `fedtune node train` is a process that loads torch (seconds), and the
    tests below only read what the two rounds left."""
    workdir = tmp_path_factory.mktemp("node-train")
    write_demo_data(workdir / "data", domain="hospital", train=64, held_out=8)
    first = node_train(workdir, tiny_model_dir)
    assert first.returncode == 0, first.stderr
    epsilon_1 = latest_metrics(workdir)["privacy"]["epsilon_after"]
    second = node_train(workdir, tiny_model_dir)
    assert second.returncode == 0, second.stderr
    return TwoRounds(workdir, epsilon_1, second)


def test_epsilon_survives_restarts_and_keeps_growing(two_rounds):
    workdir, epsilon_1 = two_rounds.workdir, two_rounds.epsilon_1
    metrics = latest_metrics(workdir)
    privacy = metrics["privacy"]

    assert 0 < epsilon_1 < privacy["epsilon_after"] <= 8.0
    ledger = NodeLedger(workdir / "state", node="hospital").entries()
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger]
    assert [e.seq for e in ledger] == [1, 2] and metrics["ledger"]["hash"] == ledger[1].hash
    assert len(history) == 2
    assert privacy["epsilon_after"] == pytest.approx(
        epsilon_of(history, delta=1e-5, accountant="rdp")
    )
    # The summary is the signed entry itself (one vocabulary), with the budget's plan beside it.
    assert (privacy["seq"], privacy["prev_hash"]) == (2, ledger[0].hash)
    assert (privacy["target_epsilon"], privacy["planned_rounds"]) == (8.0, 3)
    # The plan (3 rounds to epsilon 8) keeps its noise from round to round.
    assert history[0][0] == pytest.approx(history[1][0], rel=0.01)


def test_metrics_and_adapter_are_written_and_load_with_plain_peft(two_rounds, tiny_model_dir):
    result = two_rounds.second

    metrics = latest_metrics(two_rounds.workdir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, metrics["adapter_dir"])

    assert len(metrics["train_loss"]) == metrics["steps"] == 3
    for key in (
        "epsilon_after",
        "epsilon_round",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "max_grad_norm",
        "accountant",
    ):
        assert metrics["privacy"][key] is not None
    assert metrics["privacy"]["accountant"] == "rdp"
    assert metrics["privacy"]["accountant_version"].startswith("opacus")
    assert (metrics["privacy"]["method"], metrics["privacy"]["privacy_unit"]) == (
        "dp-sgd",
        "example",
    )
    for phase in ("before", "after"):
        assert metrics["held_out"][phase]["perplexity"] > 1
    with torch.no_grad():
        assert torch.isfinite(adapted(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    assert "held-out loss" in result.stdout and "epsilon" in result.stdout


def test_a_round_past_the_target_is_refused_and_nothing_is_lost(two_rounds, tiny_model_dir):
    """Runs last on the shared node: refused, it must leave the ledger and outputs as they were
    (its two rounds spent more than 0.5)."""
    workdir = two_rounds.workdir
    before = NodeLedger(workdir / "state", node="hospital").entries()
    outputs = sorted((workdir / "out").iterdir())

    refused = node_train(workdir, tiny_model_dir, target=0.5)

    assert refused.returncode == 2
    assert "already spent epsilon" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert NodeLedger(workdir / "state", node="hospital").entries() == before
    assert sorted((workdir / "out").iterdir()) == outputs


def test_non_private_mode_is_labelled_and_spends_no_epsilon(workdir, tiny_model_dir):
    result = node_train(workdir, tiny_model_dir, mode="non-private")
    assert result.returncode == 0, result.stderr

    privacy = latest_metrics(workdir, "non-private")["privacy"]

    assert privacy["mode"] == "non-private"
    assert (privacy["method"], privacy["privacy_unit"]) == ("none", None)
    assert privacy["epsilon_after"] is None
    assert "NON-PRIVATE" in result.stdout


def test_bad_config_is_reported_with_file_and_key(workdir, tiny_model_dir):
    config = workdir / "bad.toml"
    config.write_text(CONFIG.format(model=tiny_model_dir, mode="dp", steps=0, target=8.0))

    result = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "node", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 2
    assert f"{config}: training.steps" in result.stderr
