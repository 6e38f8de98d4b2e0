"""`fedtune node train` with training.method = "grpo", end to end on a tiny model: the round
trains, signs a prompt-level entry that the independent accountant recomputes, and saves a
PEFT adapter; an operator's reward that raises is named with the row and does not stop it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.demo.data import write_demo_data
from fedtune.demo.verifiable import write_demo_prompts
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.node_ledger import NodeLedger

pytestmark = pytest.mark.e2e
COMMAND = (sys.executable, "-m", "fedtune.cli", "node", "train", "--config")

CONFIG = """
[node]
name = "hospital"
state_dir = "state"

[model]
spec = "{model}"

[data]
train = "data/hospital/{train}"
eval = "data/hospital/grpo_held_out.jsonl"
max_length = 160

[training]
method = "grpo"
grpo_group_size = 2
grpo_max_completion_tokens = 6
grpo_rewards = {rewards}
steps = 2
batch_size = 4
physical_batch_size = 2

[privacy]
target_epsilon = 8.0

[output]
dir = "out"
"""


@pytest.fixture
def workdir(tmp_path):
    write_demo_data(tmp_path / "data", domain="hospital", train=16, held_out=4)
    write_demo_prompts(tmp_path / "data", domain="hospital", train=16, held_out=4)
    return tmp_path


def install_broken_reward(folder: Path) -> str:
    """A package declaring the reward ``flaky`` in the fedtune.rewards entry point group,
    which raises on every call; returns the folder to put on PYTHONPATH."""
    (folder / "flaky_reward.py").write_text(
        textwrap.dedent(
            """
            def flaky(completion, answer):
                raise RuntimeError("cannot score " + answer)
            """
        )
    )
    info = folder / "flaky_reward-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky-reward\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fedtune.rewards]\nflaky = flaky_reward:flaky\n")
    return str(folder)


def node_train(
    workdir: Path, model_dir: Path, *, train: str, rewards: str, path: str | None = None
) -> subprocess.CompletedProcess:
    config = workdir / "node.toml"
    config.write_text(CONFIG.format(model=model_dir, train=train, rewards=rewards))
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [*COMMAND, str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def test_a_grpo_round_trains_records_a_prompt_entry_and_saves_a_peft_adapter(
    workdir, tiny_model_dir
):
    result = node_train(
        workdir, tiny_model_dir, train="grpo_train.jsonl", rewards='["answer_exact", "format"]'
    )
    assert result.returncode == 0, result.stderr

    [metrics_file] = (workdir / "out").glob("*-dp/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    privacy = metrics["privacy"]
    assert (privacy["method"], privacy["privacy_unit"]) == ("dp-grpo", "prompt")
    assert metrics["training"]["grpo_group_size"] == 2
    assert len(metrics["train_loss"]) == 2
    for phase in ("before", "after"):
        assert 0 <= metrics["held_out"][phase]["mean_reward"] <= 2
    assert set(metrics["grpo"]["seconds"]) == {"generation", "reward", "update"}
    entries = NodeLedger(workdir / "state", node="hospital").entries()
    assert [e.data_fingerprint for e in entries] == [
        file_fingerprint(workdir / "data/hospital/grpo_train.jsonl")
    ]
    assert all(check.agrees for check in recompute_ledger([e.to_dict() for e in entries]))
    assert "privacy unit: one prompt" in result.stdout and "held-out reward" in result.stdout
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, metrics["adapter_dir"])
    with torch.no_grad():
        assert torch.isfinite(adapted(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_a_reward_that_raises_is_named_with_the_row_and_the_round_goes_on(
    workdir, tiny_model_dir, tmp_path_factory
):
    path = install_broken_reward(tmp_path_factory.mktemp("site"))

    result = node_train(
        workdir, tiny_model_dir, train="grpo_train.jsonl", rewards='["flaky", "format"]', path=path
    )

    assert result.returncode == 0, result.stderr
    [metrics_file] = (workdir / "out").glob("*-dp/metrics.json")
    failures = json.loads(metrics_file.read_text())["grpo"]["reward_failures"]
    assert failures and all(
        f.startswith("reward 'flaky' raised RuntimeError on ")
        and "data/hospital/grpo_train.jsonl:" in f
        for f in failures
    )
    assert "rewards failed" in result.stdout and "reward 'flaky'" in result.stdout
    assert "cannot score" not in result.stdout + result.stderr  # the row's text stays out
    assert len(NodeLedger(workdir / "state", node="hospital").entries()) == 1


def test_grpo_on_data_without_answers_is_refused_in_one_line(workdir, tiny_model_dir):
    result = node_train(workdir, tiny_model_dir, train="train.jsonl", rewards='["format"]')

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "train.jsonl:1: missing field 'answer'" in last
    assert last.endswith('training.method = "grpo" needs rows {"prompt", "answer"}')
