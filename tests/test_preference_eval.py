"""Held-out preference evaluation on a tiny random model: the implicit DPO reward's margins
against an independent per-pair computation, the base model's zero, a model trained with
DPO preferring the chosen answers, and what a node's evaluate and A/B replies carry."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message, Metadata, RecordDict
from test_client_app import LORA, fresh_process_cache, initial_arrays  # noqa: F401

from fedtune.client_node.client_app import abtest_reply, handle_evaluate
from fedtune.client_node.dpo import pair_losses
from fedtune.client_node.preference_data import load_preference_dataset, make_pair_collate
from fedtune.client_node.preference_eval import evaluate_preferences
from fedtune.demo.data import write_demo_data
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.config import (
    DataConfig,
    ModelConfig,
    NodeConfig,
    NodeSettings,
    PrivacySettings,
    TrainingSettings,
)
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.lora import attach_lora
from fedtune.platform.wire.messages import AbTestInstructions, TrainInstructions, arrays_to_record

BETA = 0.25
CPU = torch.device("cpu")


@pytest.fixture
def pairs(tmp_path, tiny_tokenizer):
    write_demo_preferences(tmp_path / "data", domain="bank", train=8, held_out=4)
    return load_preference_dataset(
        tmp_path / "data/bank/preferences_train.jsonl", tiny_tokenizer, max_length=256
    )


@pytest.fixture
def adapted(tiny_model):
    """A LoRA model whose adapter is not zero (B drawn at random), so it differs from base."""
    model = attach_lora(tiny_model, LORA)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    return model


def summed_logprob(model, input_ids, labels) -> float:
    """One answer's summed log-probability: one row, no padding, plain log-softmax."""
    logits = model(input_ids=input_ids[None]).logits[0, :-1]
    targets = labels[1:]
    keep = targets != -100
    return float(F.log_softmax(logits[keep].float(), dim=-1).gather(1, targets[keep, None]).sum())


def test_margins_are_beta_times_the_policys_log_ratio_gain_over_the_base(adapted, pairs):
    expected = []
    with torch.no_grad():
        for chosen_ids, chosen_labels, rejected_ids, rejected_labels in pairs:
            policy = summed_logprob(adapted, chosen_ids, chosen_labels) - summed_logprob(
                adapted, rejected_ids, rejected_labels
            )
            with adapted.disable_adapter():
                base = summed_logprob(adapted, chosen_ids, chosen_labels) - summed_logprob(
                    adapted, rejected_ids, rejected_labels
                )
            expected.append(BETA * (policy - base))

    result = evaluate_preferences(
        adapted, pairs, beta=BETA, pad_token_id=0, device=torch.device("cpu"), batch_size=3
    )

    assert result.margins == pytest.approx(expected, abs=1e-4)
    assert any(abs(m) > 1e-3 for m in expected)  # the adapter does move the rewards
    assert result.accuracy == sum(m > 0 for m in expected) / len(expected)
    assert result.mean_margin == pytest.approx(np.mean(expected), abs=1e-4)
    assert result.tokens_read > 0


def test_the_base_model_is_its_own_reference_so_its_rewards_are_zero(adapted, pairs):
    result = evaluate_preferences(
        adapted, pairs, beta=BETA, pad_token_id=0, device=torch.device("cpu"), adapter=False
    )

    assert result.margins == (0.0,) * len(pairs)
    assert result.accuracy == 0.0 and result.mean_margin == 0.0


def test_dpo_training_makes_the_implicit_reward_prefer_the_chosen_answers(tiny_model, pairs):
    model = attach_lora(tiny_model, LORA)
    batch = make_pair_collate(0)([pairs[i] for i in range(4)])
    before = evaluate_preferences(model, pairs, beta=BETA, pad_token_id=0, device=CPU, limit=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(6):
        optimizer.zero_grad()
        pair_losses(model, batch, torch.device("cpu"), beta=BETA).mean().backward()
        optimizer.step()

    after = evaluate_preferences(model, pairs, beta=BETA, pad_token_id=0, device=CPU, limit=4)

    assert before.accuracy == 0.0  # B = 0: the adapter starts as the base model
    assert after.accuracy == 1.0 and after.mean_margin > 0.5


# --- what a node sends ------------------------------------------------------------------------


def preference_node(tmp_path, model_dir, *, release_metrics="plain", held_out="preferences"):
    write_demo_data(tmp_path / "data", domain="bank", train=16, held_out=4)
    write_demo_preferences(tmp_path / "data", domain="bank", train=16, held_out=6)
    eval_file = "preferences_held_out.jsonl" if held_out == "preferences" else "held_out.jsonl"
    return NodeConfig(
        node=NodeSettings(name="bank", state_dir=tmp_path / "state"),
        model=ModelConfig(spec=str(model_dir)),
        data=DataConfig(
            train=tmp_path / "data/bank/preferences_train.jsonl",
            eval=tmp_path / "data/bank" / eval_file,
            max_length=128,
        ),
        training=TrainingSettings(physical_batch_size=4, seed=0),
        privacy=PrivacySettings(target_epsilon=8.0, release_metrics=release_metrics),
    )


def message(content: RecordDict, kind: str) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=42,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def evaluate_message(model_dir) -> Message:
    config = TrainInstructions(
        run_id="run-dpo",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        steps=1,
        batch_size=8,
        learning_rate=0.01,
        optimizer="adamw",
        planned_rounds=1,
        lora=LORA,
        evaluate_local_model=False,
        method="dpo",
        dpo_beta=BETA,
    ).to_record()
    config["server-round"] = 1
    arrays = arrays_to_record(initial_arrays(model_dir))
    return message(RecordDict({"arrays": arrays, "config": config}), "evaluate")


def test_an_evaluate_reply_carries_preference_accuracy_and_margin_of_the_held_out_pairs(
    tmp_path, tiny_model_dir
):
    node = preference_node(tmp_path, tiny_model_dir)

    reply = handle_evaluate(node, evaluate_message(tiny_model_dir))

    metrics = reply.content.metric_records["metrics"]
    assert metrics["held-out-pairs"] == 6
    # The round's global adapter is the base model's (B = 0): its rewards are zero.
    assert metrics["preference-accuracy"] == 0.0
    assert metrics["reward-margin"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(metrics["held-out-loss"])


@pytest.mark.parametrize("release_metrics", ["dp", "none"])
def test_a_node_not_releasing_plain_metrics_sends_no_preference_figures(
    tmp_path, tiny_model_dir, release_metrics
):
    node = preference_node(tmp_path, tiny_model_dir, release_metrics=release_metrics)

    reply = handle_evaluate(node, evaluate_message(tiny_model_dir))

    metrics = reply.content.metric_records.get("metrics", {})
    assert not {"held-out-pairs", "preference-accuracy", "reward-margin"} & set(metrics)


def abtest_content(model_dir, arrays, metrics) -> RecordDict:
    instructions = AbTestInstructions(
        test_id="ab-1",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        version_a="base",
        version_b="run/1",
        lora_a=None,
        lora_b=LORA,
        metrics=metrics,
        max_examples=5,
        max_new_tokens=4,
        dpo_beta=BETA,
    )
    return RecordDict({"abtest": instructions.to_record(), "arrays-b": arrays_to_record(arrays)})


def test_an_ab_test_scores_each_pair_for_both_versions_with_the_base_at_zero(
    tmp_path, tiny_model_dir, adapted
):
    from fedtune.platform.model.lora import adapter_arrays

    node = preference_node(tmp_path, tiny_model_dir)
    content = abtest_content(
        tiny_model_dir, adapter_arrays(adapted), ("loss", "preference-accuracy", "reward-margin")
    )

    reply = abtest_reply(node, content)

    scores = reply.metric_records["scores"]
    assert scores["preference-accuracy/a"] == [0.0] * 5
    assert scores["reward-margin/a"] == [0.0] * 5
    assert set(scores["preference-accuracy/b"]) <= {0.0, 1.0}
    assert len(scores["reward-margin/b"]) == len(scores["loss/b"]) == 5  # the same pairs
    assert any(abs(m) > 1e-4 for m in scores["reward-margin/b"])
    accuracy_b = [float(m > 0) for m in scores["reward-margin/b"]]
    assert scores["preference-accuracy/b"] == accuracy_b


def test_a_node_without_held_out_pairs_declines_a_preference_ab_test_saying_why(
    tmp_path, tiny_model_dir, adapted
):
    from fedtune.platform.model.lora import adapter_arrays

    node = preference_node(tmp_path, tiny_model_dir, held_out="conversations")
    content = abtest_content(tiny_model_dir, adapter_arrays(adapted), ("preference-accuracy",))

    reply = abtest_reply(node, content)

    reason = reply.config_records["decline"]["reason"]
    assert "holds no held-out preference pairs" in reason and "held_out.jsonl" in reason
