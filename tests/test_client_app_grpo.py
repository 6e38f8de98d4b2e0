"""The ClientApp in a GRPO run: the run's config chooses the method and its settings; a node
trains it on its prompts and reports the round's reward health, or declines in one line
(data of another kind, a reward it does not have)."""

import time

import numpy as np
import pytest
from flwr.app import Message, Metadata, RecordDict
from test_client_app import LORA, fresh_process_cache, initial_arrays  # noqa: F401

from fedtune.client_node.client_app import handle_train
from fedtune.demo.data import write_demo_data
from fedtune.demo.verifiable import write_demo_prompts
from fedtune.platform.config import (
    GRPO_DEFAULTS,
    DataConfig,
    ModelConfig,
    NodeConfig,
    NodeSettings,
    PrivacySettings,
    TrainingSettings,
)
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.wire.messages import (
    GRPO_METRICS,
    TrainInstructions,
    arrays_to_record,
    ledger_from_content,
)
from fedtune.privacy.node_ledger import NodeLedger

GRPO = {
    **GRPO_DEFAULTS,
    "grpo_group_size": 2,
    "grpo_max_completion_tokens": 6,
    "grpo_rewards": ["answer_numeric", "format"],
    "grpo_numeric_tolerance": 0.01,
}


def node_config(tmp_path, model_dir, *, train: str, held_out: str) -> NodeConfig:
    write_demo_data(tmp_path / "data", domain="bank", train=16, held_out=4)
    write_demo_prompts(tmp_path / "data", domain="bank", train=16, held_out=4)
    return NodeConfig(
        node=NodeSettings(name="bank", state_dir=tmp_path / "state"),
        model=ModelConfig(spec=str(model_dir)),
        data=DataConfig(
            train=tmp_path / "data/bank" / train,
            eval=tmp_path / "data/bank" / held_out,
            max_length=160,
        ),
        training=TrainingSettings(physical_batch_size=4, seed=0),
        privacy=PrivacySettings(target_epsilon=8.0),
    )


def train_message(model_dir, *, method: str, grpo=None) -> Message:
    instructions = TrainInstructions(
        run_id="run-grpo",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        steps=1,
        batch_size=4,
        learning_rate=0.01,
        optimizer="adamw",
        planned_rounds=1,
        lora=LORA,
        evaluate_local_model=True,
        method=method,
        grpo=grpo or GRPO,
    )
    config = instructions.to_record()
    config["server-round"] = 1
    content = RecordDict({"arrays": arrays_to_record(initial_arrays(model_dir)), "config": config})
    metadata = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=42,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def test_the_grpo_settings_travel_in_the_train_message():
    sent = TrainInstructions(
        run_id="r",
        base_model_fingerprint="f",
        steps=1,
        batch_size=4,
        learning_rate=0.01,
        optimizer="adamw",
        planned_rounds=1,
        lora=LORA,
        evaluate_local_model=False,
        method="grpo",
        grpo=GRPO,
    )

    assert TrainInstructions.from_record(sent.to_record()) == sent


def test_a_grpo_run_trains_the_nodes_prompts_and_signs_a_prompt_level_entry(
    tmp_path, tiny_model_dir
):
    node = node_config(
        tmp_path, tiny_model_dir, train="grpo_train.jsonl", held_out="grpo_held_out.jsonl"
    )

    reply = handle_train(node, train_message(tiny_model_dir, method="grpo"))

    assert "decline" not in reply.content.config_records
    entry, _ = ledger_from_content(reply.content)
    assert (entry.method, entry.privacy_unit) == ("dp-grpo-seeded-noise", "prompt")
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 16  # prompts
    assert set(GRPO_METRICS) <= set(metrics)
    assert 0 < metrics["grpo-completion-tokens"] <= 6
    assert np.isfinite(metrics["held-out-loss-local"])  # the reference answers' loss


@pytest.mark.parametrize(
    ("train", "held_out", "method", "grpo", "reason"),
    [
        (
            "train.jsonl",
            "held_out.jsonl",
            "grpo",
            None,
            'the run trains with GRPO (training.method = "grpo"), and its data',
        ),
        (
            "grpo_train.jsonl",
            "grpo_held_out.jsonl",
            "sft",
            GRPO_DEFAULTS,
            "holds prompts with answers, not conversations",
        ),
        (
            "grpo_train.jsonl",
            "grpo_held_out.jsonl",
            "grpo",
            {**GRPO, "grpo_rewards": ["triage_distance"]},
            "unknown reward 'triage_distance'",
        ),
    ],
)
def test_a_node_that_cannot_train_the_runs_grpo_declines_in_one_line(
    tmp_path, tiny_model_dir, train, held_out, method, grpo, reason
):
    node = node_config(tmp_path, tiny_model_dir, train=train, held_out=held_out)

    reply = handle_train(node, train_message(tiny_model_dir, method=method, grpo=grpo))

    said = str(reply.content.config_records["decline"]["reason"])
    assert reason in said and "\n" not in said
    assert not reply.content.array_records
    assert NodeLedger(node.node.state_dir, node="bank").entries() == []  # nothing spent


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("grpo_group_size", 1),  # one completion per group: no relative advantage at all
        ("grpo_temperature", 0.0),
        ("grpo_clip_ratio", 5.0),
    ],
)
def test_a_train_message_with_settings_the_node_would_refuse_is_declined(
    tmp_path, tiny_model_dir, setting, value
):
    """The coordinator's settings pass the node's own configuration checks: what a node's
    TOML may not say, a train message may not say either."""
    node = node_config(
        tmp_path, tiny_model_dir, train="grpo_train.jsonl", held_out="grpo_held_out.jsonl"
    )

    reply = handle_train(
        node, train_message(tiny_model_dir, method="grpo", grpo={**GRPO, setting: value})
    )

    said = str(reply.content.config_records["decline"]["reason"])
    assert setting in said and "\n" not in said
    assert not reply.content.array_records
    assert NodeLedger(node.node.state_dir, node="bank").entries() == []  # nothing spent
