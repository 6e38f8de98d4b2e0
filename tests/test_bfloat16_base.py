"""model.dtype = "bfloat16": the base weights in bfloat16, the LoRA adapter and everything DP
does with it in float32 (a tiny random Qwen2 on CPU; the GPU run is scripts/gpu-check.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.client_node.data import ChatDataset, make_collate, tokenize_conversation
from fedtune.client_node.losses import sequence_losses
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.demo.data import generate_examples
from fedtune.demo.tiny_models import save_tiny_model_dir
from fedtune.platform.config import ConfigError, LoraSettings, ModelConfig, load_node_config
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.lora import attach_lora

NODE = """
[node]
name = "hospital-a"

[data]
train = "data/train.jsonl"
eval = "data/held_out.jsonl"

[output]
dir = "out"

[model]
"""
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("qwen2"), family="qwen2")


@pytest.fixture(scope="module")
def examples(qwen2_dir) -> ChatDataset:
    tokenizer = load_base_model(ModelConfig(spec=str(qwen2_dir), device="cpu")).tokenizer
    conversations = [e["messages"] for e in generate_examples("hospital", 6, seed=3)]
    rows = [tokenize_conversation(c, tokenizer, max_length=160) for c in conversations]
    return ChatDataset(rows, source=Path("hospital.jsonl"))


def bfloat16_adapted(qwen2_dir: Path) -> tuple[PeftModel, int]:
    base = load_base_model(ModelConfig(spec=str(qwen2_dir), device="cpu", dtype="bfloat16"))
    model = attach_lora(base.model, LoraSettings(r=4, train_a=True))
    return model, int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]


def test_an_unknown_dtype_is_refused_naming_the_key_and_the_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(NODE + 'dtype = "float16"\n')

    with pytest.raises(ConfigError) as error:
        load_node_config(path)

    assert str(path) in str(error.value)
    assert "model.dtype" in str(error.value)


def test_bfloat16_with_quantization_is_refused_in_one_line(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(NODE + 'dtype = "bfloat16"\nquantization = "4bit"\n')

    with pytest.raises(ConfigError, match="quantizer sets the precision"):
        load_node_config(path)


def test_bfloat16_base_weights_get_a_float32_adapter_and_the_same_fingerprint(qwen2_dir):
    base = load_base_model(ModelConfig(spec=str(qwen2_dir), device="cpu", dtype="bfloat16"))
    model = attach_lora(base.model, LoraSettings(r=4, train_a=True))

    adapter = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert adapter and set(adapter.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.bfloat16}
    assert base.fingerprint == model_dir_fingerprint(qwen2_dir)


def test_a_dp_step_on_bfloat16_weights_clips_each_examples_float32_gradient(qwen2_dir, examples):
    """Noise off, SGD at lr 1, every example in the batch: the update is minus the mean of
    the examples' own gradients (plain autograd, one at a time), each clipped to the norm."""
    model, pad = bfloat16_adapted(qwen2_dir)
    model.train()
    clip = 1e-3
    parameters = [p for p in model.parameters() if p.requires_grad]
    collate = make_collate(pad)
    gradients = []
    for index in range(len(examples)):
        loss = sequence_losses(model, collate([examples[index]]), CPU).sum()
        grads = torch.autograd.grad(loss, parameters)
        assert {g.dtype for g in grads} == {torch.float32}
        gradients.append(torch.cat([g.flatten() for g in grads]))
    clipped = [g * min(1.0, clip / float(g.norm())) for g in gradients]
    before = torch.cat([p.detach().flatten() for p in parameters])

    train_round(
        model,
        examples,
        steps=1,
        batch_size=len(examples),
        physical_batch_size=3,
        learning_rate=1.0,
        optimizer="sgd",
        pad_token_id=pad,
        device=CPU,
        dp=DPSettings(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp"),
        seed=0,
        progress=False,
    )

    after = torch.cat([p.detach().flatten() for p in parameters])
    assert min(float(g.norm()) for g in gradients) > clip  # clipping is at work
    assert float((after - before).norm()) <= clip * (1 + 1e-4)
    # bfloat16 activations differ a little between a padded batch and one example alone
    # (measured: 0.4% of the update).
    expected = -torch.stack(clipped).mean(dim=0)
    assert float((after - before - expected).norm()) < 0.02 * float(expected.norm())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_an_adapter_trained_on_bfloat16_weights_loads_with_plain_peft(
    qwen2_dir, examples, tmp_path
):
    model, pad = bfloat16_adapted(qwen2_dir)
    train_round(
        model,
        examples,
        steps=1,
        batch_size=len(examples),
        physical_batch_size=6,
        learning_rate=0.5,
        optimizer="sgd",
        pad_token_id=pad,
        device=CPU,
        dp=DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, accountant="rdp"),
        seed=0,
        progress=False,
    )
    model.save_pretrained(tmp_path / "adapter")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    plain = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(plain, tmp_path / "adapter")

    reloaded = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(reloaded) == set(trained)
    for name, value in trained.items():
        assert reloaded[name].dtype == torch.float32
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0)
