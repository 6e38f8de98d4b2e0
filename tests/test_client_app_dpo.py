"""The ClientApp in a DPO run: the run's config chooses the method; a node trains it on its
preference pairs, or declines in one line when its data holds none."""

import time

import numpy as np
import pytest
from flwr.app import Message, Metadata, RecordDict
from test_client_app import LORA, fresh_process_cache, initial_arrays  # noqa: F401

from fedtune.client_node.client_app import handle_train
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
from fedtune.platform.model.fingerprint import file_fingerprint, model_dir_fingerprint
from fedtune.platform.wire.messages import TrainInstructions, arrays_to_record, ledger_from_content
from fedtune.privacy.node_ledger import NodeLedger


def node_config(tmp_path, model_dir, *, train: str, held_out: str) -> NodeConfig:
    write_demo_data(tmp_path / "data", domain="bank", train=24, held_out=4)
    write_demo_preferences(tmp_path / "data", domain="bank", train=24, held_out=4)
    return NodeConfig(
        node=NodeSettings(name="bank", state_dir=tmp_path / "state"),
        model=ModelConfig(spec=str(model_dir)),
        data=DataConfig(
            train=tmp_path / "data/bank" / train,
            eval=tmp_path / "data/bank" / held_out,
            max_length=128,
        ),
        training=TrainingSettings(physical_batch_size=4, seed=0),
        privacy=PrivacySettings(target_epsilon=8.0),
    )


def train_message(model_dir, *, method: str) -> Message:
    instructions = TrainInstructions(
        run_id="run-dpo",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        steps=1,
        batch_size=8,
        learning_rate=0.01,
        optimizer="adamw",
        planned_rounds=1,
        lora=LORA,
        evaluate_local_model=True,
        method=method,
        dpo_beta=0.25,
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


def test_a_dpo_run_trains_the_nodes_preference_pairs_and_signs_a_pair_level_entry(
    tmp_path, tiny_model_dir
):
    node = node_config(
        tmp_path,
        tiny_model_dir,
        train="preferences_train.jsonl",
        held_out="preferences_held_out.jsonl",
    )

    reply = handle_train(node, train_message(tiny_model_dir, method="dpo"))

    assert "decline" not in reply.content.config_records
    entry, _ = ledger_from_content(reply.content)
    assert (entry.method, entry.privacy_unit) == ("dp-dpo-seeded-noise", "preference_pair")
    metrics = reply.content.metric_records["metrics"]
    assert 20 <= metrics["num-examples"] <= 24  # pairs
    assert np.isfinite(metrics["held-out-loss-start"])  # the chosen answers' loss
    assert np.isfinite(metrics["held-out-loss-local"])


@pytest.mark.parametrize(
    ("train", "held_out", "method", "reason"),
    [
        (
            "train.jsonl",
            "held_out.jsonl",
            "dpo",
            'the run trains with DPO (training.method = "dpo"), and its data',
        ),
        (
            "preferences_train.jsonl",
            "preferences_held_out.jsonl",
            "sft",
            "holds preference pairs, not conversations",
        ),
    ],
)
def test_a_node_whose_data_does_not_fit_the_runs_method_declines_in_one_line(
    tmp_path, tiny_model_dir, train, held_out, method, reason
):
    node = node_config(tmp_path, tiny_model_dir, train=train, held_out=held_out)

    reply = handle_train(node, train_message(tiny_model_dir, method=method))

    said = str(reply.content.config_records["decline"]["reason"])
    assert reason in said and "\n" not in said
    assert str(node.data.train) in said
    assert not reply.content.array_records
    assert NodeLedger(node.node.state_dir, node="bank").entries() == []  # nothing spent


def test_a_node_in_a_budget_group_states_the_group_and_its_epsilon_beside_the_round(
    tmp_path, tiny_model_dir
):
    node = node_config(
        tmp_path, tiny_model_dir, train="preferences_train.jsonl", held_out="held_out.jsonl"
    )
    sft = tmp_path / "data/bank/train.jsonl"
    node = node.model_copy(
        update={"data": node.data.model_copy(update={"shares_budget_with": [sft]})}
    )

    reply = handle_train(node, train_message(tiny_model_dir, method="dpo"))

    budget = reply.content.config_records["budget"]
    entry, _ = ledger_from_content(reply.content)
    assert list(budget["budget_group"]) == [file_fingerprint(sft)]
    # Nothing was spent on the SFT file yet: the group's epsilon is this round's.
    assert budget["group_epsilon"] == pytest.approx(entry.epsilon_after)
