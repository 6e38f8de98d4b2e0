"""The GRPO demo end to end on a tiny model (the real one takes minutes per round): a cold
start saved as a PEFT adapter, a federated DP-GRPO run that starts from it, and the held-out
reward of the base, the cold start and the final adapter per node."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.demo.grpo_demo import run_grpo_demo
from fedtune.platform.config import ConfigError, load_run_config

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory, tiny_tokenizer):
    """The tiny model with room for the demo's prompts in the tiny tokenizer's many tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("long-context")
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_the_grpo_demo_starts_from_its_cold_start_and_reports_held_out_rewards(
    tmp_path, long_context_model
):
    lines = []

    summary = run_grpo_demo(
        tmp_path / "demo",
        rounds=1,
        steps=1,
        model=str(long_context_model),
        train=8,
        held_out=2,
        cold_start_steps=1,
        cold_start_examples=4,
        group=2,
        max_tokens=4,
        max_length=1000,
        progress=lines.append,
    )

    config = load_run_config(tmp_path / "demo" / "run.toml")
    assert config.training.method == "grpo"
    assert config.run.initial_adapter == tmp_path / "demo" / "cold_start"
    assert (tmp_path / "demo" / "cold_start" / "adapter_model.safetensors").is_file()
    rewards = summary["grpo"]["held_out_reward"]
    assert set(rewards) == {"hospital", "bank"}
    assert all(set(r) == {"base", "cold_start", "final"} for r in rewards.values())
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["grpo"] is not None
    assert any("held-out reward at hospital" in line for line in lines)
    with pytest.raises(ConfigError, match="new or empty folder"):
        run_grpo_demo(tmp_path / "demo", model=str(long_context_model))
