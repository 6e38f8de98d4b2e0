"""The model families (Llama, Qwen2, DeepSeek-V2/V3 mixture-of-experts) train with DP-LoRA:
tiny random configs of each architecture, real PEFT and Opacus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import build_tiny_model
from fedtune.client_node.data import ChatDataset, make_collate, tokenize_conversation
from fedtune.client_node.losses import sequence_losses
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.demo.data import generate_examples
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.families import LoraTargetError, check_routing_frozen
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.lora import attach_lora

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
# Layer 0 dense, layer 1 a mixture of 4 routed experts (2 per token) and 1 shared expert.
MOE = {
    "moe_intermediate_size": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "num_key_value_heads": 4,
}
FAMILIES = ["llama", "qwen2", "deepseek_v2", "deepseek_v3"]
DEFAULT_TARGETS = {
    "llama": {"q_proj", "v_proj"},
    "qwen2": {"q_proj", "v_proj"},
    # DeepSeek-V2-Lite style: a full-rank query projection.
    "deepseek_v2": {"q_proj", "kv_b_proj"},
    # DeepSeek-V3 style: a low-rank query (q_a_proj -> q_b_proj).
    "deepseek_v3": {"q_b_proj", "kv_b_proj"},
}


def build_family(family: str, vocab_size: int, *, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model: PreTrainedModel
    if family == "llama":
        model = build_tiny_model(vocab_size, seed=seed)
    elif family == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab_size, num_key_value_heads=2, tie_word_embeddings=True, **SMALL
        )
        model = Qwen2ForCausalLM(config)
    elif family == "deepseek_v2":
        config = DeepseekV2Config(vocab_size=vocab_size, q_lora_rank=None, **SMALL, **MOE)
        model = DeepseekV2ForCausalLM(config)
    else:
        config = DeepseekV3Config(
            vocab_size=vocab_size, q_lora_rank=32, n_group=1, topk_group=1, **SMALL, **MOE
        )
        model = DeepseekV3ForCausalLM(config)
    return model.eval()


@pytest.fixture(scope="module")
def examples(tiny_tokenizer) -> ChatDataset:
    conversations = [e["messages"] for e in generate_examples("hospital", 6, seed=3)]
    tokenized = [tokenize_conversation(c, tiny_tokenizer, max_length=160) for c in conversations]
    return ChatDataset(tokenized, source=Path("hospital.jsonl"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Each family saved as a local Hugging Face directory with the tiny tokenizer."""
    dirs = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_family(family, len(tiny_tokenizer)).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[family] = path
    return dirs


def trainable_layers(model: torch.nn.Module) -> set[str]:
    """The layer names (last part) that carry trainable LoRA weights."""
    return {
        name.split(".lora_")[0].rsplit(".", 1)[-1]
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_adapts_its_default_attention_layers(family, tiny_tokenizer):
    model = attach_lora(build_family(family, len(tiny_tokenizer)), LoraSettings(train_a=True))

    assert trainable_layers(model) == DEFAULT_TARGETS[family]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def per_example_gradients(model, dataset: ChatDataset, pad_token_id: int) -> list[torch.Tensor]:
    """Each example's gradient of its own loss, by plain autograd, one example at a time."""
    collate = make_collate(pad_token_id)
    parameters = [p for p in model.parameters() if p.requires_grad]
    gradients = []
    for index in range(len(dataset)):
        loss = sequence_losses(model, collate([dataset[index]]), torch.device("cpu")).sum()
        gradients.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)]))
    return gradients


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        *[(family, None) for family in FAMILIES],
        # Every adaptable linear layer: all of DeepSeek's attention.
        ("deepseek_v3", ["all-linear"]),
        ("qwen2", ["all-linear"]),
    ],
)
def test_a_dp_step_adds_each_examples_own_gradient_clipped_to_the_norm(
    family, targets, tiny_tokenizer, examples
):
    """Noise off, SGD at lr 1 and a sample rate of 1: the update must be minus the mean of the
    examples' independently computed gradients, each clipped to max_grad_norm."""
    model = attach_lora(
        build_family(family, len(tiny_tokenizer)),
        LoraSettings(r=4, train_a=True, target_modules=targets),
    )
    model.train()
    clip = 1e-3
    gradients = per_example_gradients(model, examples, tiny_tokenizer.pad_token_id)
    clipped = [g * min(1.0, clip / float(g.norm())) for g in gradients]
    before = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    result = train_round(
        model,
        examples,
        steps=1,
        batch_size=len(examples),  # sample rate 1: every example is in the batch
        physical_batch_size=4,  # two physical batches, padded differently
        learning_rate=1.0,
        optimizer="sgd",
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=torch.device("cpu"),
        dp=DPSettings(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp"),
        seed=0,
        progress=False,
    )

    after = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert result.sample_rate == 1.0
    assert min(float(g.norm()) for g in gradients) > clip  # clipping is at work
    expected = -torch.stack(clipped).mean(dim=0)
    torch.testing.assert_close(after - before, expected, rtol=1e-3, atol=1e-8)
    assert float((after - before).norm()) <= clip * (1 + 1e-4)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_the_trained_adapter_loads_with_plain_peft(family, model_dirs, tmp_path, examples):
    base = load_base_model(ModelConfig(spec=str(model_dirs[family]), device="cpu"))
    model = attach_lora(base.model, LoraSettings(r=4, train_a=True))
    tokenizer = base.tokenizer
    train_round(
        model,
        examples,
        steps=1,
        batch_size=len(examples),
        physical_batch_size=6,
        learning_rate=0.5,
        optimizer="sgd",
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        device=torch.device("cpu"),
        dp=DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, accountant="rdp"),
        seed=0,
        progress=False,
    )
    model.save_pretrained(tmp_path / "adapter")
    batch = make_collate(0)([examples[0]])

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dirs[family]), tmp_path / "adapter"
    )

    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"]).logits
        theirs = plain.eval()(input_ids=batch["input_ids"]).logits
        base_only = plain.get_base_model()
        with plain.disable_adapter():
            untrained = base_only(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, untrained)  # the adapter did change the model


def test_each_family_has_its_own_fingerprint(model_dirs):
    fingerprints = {family: model_dir_fingerprint(path) for family, path in model_dirs.items()}

    assert len(set(fingerprints.values())) == len(FAMILIES)


def one_line_error(model, targets) -> str:
    with pytest.raises(LoraTargetError) as error:
        attach_lora(model, LoraSettings(target_modules=targets))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_target_list_that_matches_only_in_part_is_refused_naming_what_exists(tiny_tokenizer):
    """Llama's q_proj/v_proj on DeepSeek's attention: q_proj exists, v_proj does not."""
    model = build_family("deepseek_v2", len(tiny_tokenizer))

    message = one_line_error(model, ["q_proj", "v_proj"])

    assert "'v_proj' matches no layer of this deepseek_v2 model" in message
    assert "'q_proj'" not in message
    assert "kv_b_proj" in message and "o_proj" in message
    assert not any("lora_" in name for name, _ in model.named_parameters())  # left as it was


@pytest.mark.parametrize(
    ("targets", "role"),
    [
        (["gate"], "router"),
        (["mlp.gate"], "router"),
        (["q_b_proj", "experts"], "routed experts"),
    ],
)
def test_targeting_the_router_or_routed_experts_is_refused(targets, role, tiny_tokenizer):
    model = build_family("deepseek_v3", len(tiny_tokenizer))

    message = one_line_error(model, targets)

    assert f"the {role} (model.layers.1.mlp." in message
    assert "stays frozen under DP" in message


@pytest.mark.parametrize("target", ["gate_proj", "shared_experts.up_proj", "mlp.down_proj"])
def test_mlp_names_that_peft_redirects_to_the_routed_experts_are_refused(target, tiny_tokenizer):
    """PEFT 0.21 reads these names on DeepSeek as the fused routed-expert weights (its
    transformers v4->v5 MoE conversion): a shared expert's name would silently train the
    routed experts instead."""
    model = build_family("deepseek_v3", len(tiny_tokenizer))

    message = one_line_error(model, ["q_b_proj", target])

    assert f"PEFT reads '{target}' on this deepseek_v3 model as the mixture-of-experts" in message
    assert "stay frozen under DP" in message and "kv_b_proj" in message
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_all_linear_adapts_every_linear_layer_but_the_head_and_the_routing(tiny_tokenizer):
    llama = attach_lora(build_family("llama", 400), LoraSettings(target_modules=["all-linear"]))
    moe = attach_lora(build_family("deepseek_v3", 400), LoraSettings(target_modules=["all-linear"]))

    assert trainable_layers(llama) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert trainable_layers(moe) == {
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"
    }  # fmt: skip


def test_a_router_made_trainable_by_hand_is_refused(tiny_tokenizer):
    model = attach_lora(build_family("deepseek_v3", len(tiny_tokenizer)), LoraSettings())
    model.get_base_model().model.layers[1].mlp.gate.weight.requires_grad_(True)

    with pytest.raises(LoraTargetError, match="router is trainable"):
        check_routing_frozen(model)


def test_a_target_that_is_no_linear_layer_is_refused(tiny_tokenizer):
    message = one_line_error(build_family("qwen2", len(tiny_tokenizer)), ["self_attn"])

    assert "'self_attn' matches model.layers.0.self_attn, a Qwen2Attention" in message
    assert "q_proj" in message


def test_a_family_without_defaults_asks_for_targets_and_accepts_them(tiny_tokenizer):
    config = MistralConfig(vocab_size=len(tiny_tokenizer), num_key_value_heads=2, **SMALL)

    message = one_line_error(MistralForCausalLM(config), None)
    model = attach_lora(MistralForCausalLM(config), LoraSettings(target_modules=["q_proj"]))

    assert "no default LoRA targets for model_type 'mistral'" in message
    assert "set lora.target_modules" in message and "o_proj" in message
    assert trainable_layers(model) == {"q_proj"}


def test_moe_router_outputs_and_their_auxiliary_loss_stay_out_of_the_dp_loss(
    tiny_tokenizer, examples
):
    """The per-example loss is the language-model loss alone: the same for an example
    whatever its batch (an auxiliary balancing loss would couple them), and equal to the
    cross-entropy of the model's own logits."""
    model = build_family("deepseek_v3", len(tiny_tokenizer))
    model.config.output_router_logits = True
    model = attach_lora(model, LoraSettings(r=4))
    collate = make_collate(tiny_tokenizer.pad_token_id)
    batch = collate([examples[i] for i in range(4)])

    with torch.no_grad():
        together = sequence_losses(model, batch, torch.device("cpu"))
        alone = torch.cat(
            [sequence_losses(model, collate([examples[i]]), torch.device("cpu")) for i in range(4)]
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    by_hand = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
    ).sum(dim=1) / (targets != -100).sum(dim=1)

    assert model.config.output_router_logits is False
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together, by_hand, rtol=1e-4, atol=1e-5)


def test_lora_targets_config_defaults_to_the_family_and_refuses_an_empty_list():
    assert LoraSettings().target_modules is None
    with pytest.raises(ValueError, match="at least 1 item"):
        LoraSettings(target_modules=[])
    with pytest.raises(ValueError, match="at least 1 character"):
        LoraSettings(target_modules=[""])


@pytest.mark.parametrize("targets", [None, ["q_b_proj", "kv_b_proj"]])
def test_lora_targets_travel_to_the_nodes_as_configured(targets):
    """Unset targets reach the node unset (it resolves the same family default on the same
    fingerprinted model); set ones as they are."""
    from flwr.common.serde import config_record_from_proto, config_record_to_proto

    from fedtune.platform.wire.messages import TrainInstructions

    sent = TrainInstructions(
        run_id="r",
        base_model_fingerprint="sha256:0",
        steps=1,
        batch_size=2,
        learning_rate=0.1,
        optimizer="sgd",
        planned_rounds=1,
        lora=LoraSettings(target_modules=targets),
        evaluate_local_model=False,
    )

    received = TrainInstructions.from_record(
        config_record_from_proto(config_record_to_proto(sent.to_record()))
    )

    assert received.lora == sent.lora


def test_a_redirect_peft_makes_unannounced_is_caught_after_attaching(tiny_tokenizer, monkeypatch):
    """Were PEFT's table of redirected names moved (another PEFT version), the adapter PEFT
    builds is still checked: fused expert weights adapted as parameters are refused, and the
    base model is left without LoRA layers."""
    from fedtune.platform.model import families

    monkeypatch.setattr(families, "_peft_redirects", lambda model: {})
    model = build_family("deepseek_v3", len(tiny_tokenizer))

    message = one_line_error(model, ["q_b_proj", "down_proj"])

    assert "PEFT adapted the parameters down_proj" in message
    assert "stay frozen under DP" in message
    assert not any("lora_" in name for name, _ in model.named_parameters())
