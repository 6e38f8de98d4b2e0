"""The node's ClientApp handlers, called as Flower calls them, on a tiny model."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from peft import get_peft_model_state_dict

from fedtune.client_node import client_app
from fedtune.client_node.client_app import BaseModelMismatchError, handle_evaluate, handle_train
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import (
    CoordinatorConnection,
    DataConfig,
    LoraSettings,
    ModelConfig,
    NodeConfig,
    NodeSettings,
    PrivacySettings,
    TrainingSettings,
)
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.platform.wire.messages import (
    PROTOCOL_KEY,
    TrainInstructions,
    arrays_to_record,
    ledger_from_content,
    record_to_arrays,
)
from fedtune.privacy.node_ledger import NodeLedger

LORA = LoraSettings()


@pytest.fixture(autouse=True)
def fresh_process_cache():
    """Each test starts like a fresh node process."""
    client_app._RUNTIMES.clear()
    client_app._MODELS.clear()
    yield
    client_app._RUNTIMES.clear()
    client_app._MODELS.clear()


@pytest.fixture
def node(tmp_path, tiny_model_dir) -> NodeConfig:
    write_demo_data(tmp_path / "data", domain="hospital", train=48, held_out=6)
    return NodeConfig(
        node=NodeSettings(name="hospital", state_dir=tmp_path / "state"),
        model=ModelConfig(spec=str(tiny_model_dir)),
        data=DataConfig(
            train=tmp_path / "data/hospital/train.jsonl",
            eval=tmp_path / "data/hospital/held_out.jsonl",
            max_length=160,
        ),
        training=TrainingSettings(physical_batch_size=8, seed=0),
        privacy=PrivacySettings(target_epsilon=8.0),
    )


def initial_arrays(model_dir: Path) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return adapter_arrays(attach_lora(AutoModelForCausalLM.from_pretrained(model_dir), LORA))


def server_message(
    model_dir: Path,
    *,
    fingerprint: str,
    server_round: int = 1,
    kind="train",
    run_id="run-1",
    planned_rounds=1,
):
    instructions = TrainInstructions(
        run_id=run_id,
        base_model_fingerprint=fingerprint,
        steps=2,
        batch_size=16,
        learning_rate=0.01,
        optimizer="adamw",
        planned_rounds=planned_rounds,
        lora=LORA,
        evaluate_local_model=True,
    )
    config = instructions.to_record()
    config["server-round"] = server_round
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
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def test_a_node_refuses_a_round_for_another_base_model(node, tiny_model_dir):
    other = "sha256:" + "0" * 64

    with pytest.raises(BaseModelMismatchError) as error:
        handle_train(node, server_message(tiny_model_dir, fingerprint=other))

    assert other in str(error.value)
    assert model_dir_fingerprint(tiny_model_dir) in str(error.value)
    assert NodeLedger(node.node.state_dir, node="hospital").entries() == []  # nothing spent


def test_train_replies_with_the_update_metrics_and_privacy_report(node, tiny_model_dir):
    fingerprint = model_dir_fingerprint(tiny_model_dir)
    sent = initial_arrays(tiny_model_dir)

    reply = handle_train(node, server_message(tiny_model_dir, fingerprint=fingerprint))

    arrays = record_to_arrays(reply.content.array_records["arrays"])
    assert set(arrays) == set(sent)
    changed = [k for k in arrays if not np.array_equal(arrays[k], sent[k])]
    assert changed and all("lora_B" in k for k in changed)  # FFA-LoRA: A stays as sent
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 48
    assert np.isfinite(metrics["held-out-loss-start"]) and np.isfinite(metrics["train-loss"])
    entry, _ = ledger_from_content(reply.content)  # the round's only privacy record
    assert entry.mode == "dp" and 0 < entry.epsilon_after <= 8.0 * 1.001
    # The test seeds training: its noise is reproducible, and the entry says so.
    assert (entry.accountant, entry.method, entry.privacy_unit) == (
        "rdp",
        "dp-sgd-seeded-noise",
        "example",
    )
    assert "privacy" not in reply.content.config_records  # no unsigned second copy
    budget = reply.content.config_records["budget"]
    assert budget["planned_rounds"] == 1 and budget["target_epsilon"] > 0
    assert reply.content.config_records["node"]["name"] == "hospital"


def test_a_node_declines_a_round_past_its_privacy_plan(node, tiny_model_dir):
    fingerprint = model_dir_fingerprint(tiny_model_dir)
    handle_train(node, server_message(tiny_model_dir, fingerprint=fingerprint))

    second = handle_train(node, server_message(tiny_model_dir, fingerprint=fingerprint))

    assert "decline" in second.content.config_records
    assert "already spent epsilon" in second.content.config_records["decline"]["reason"]
    assert "arrays" not in second.content.array_records


def test_a_non_private_node_declines_unless_allowed_to_send_such_updates(node, tiny_model_dir):
    fingerprint = model_dir_fingerprint(tiny_model_dir)
    non_private = node.model_copy(update={"privacy": PrivacySettings(mode="non-private")})

    reply = handle_train(non_private, server_message(tiny_model_dir, fingerprint=fingerprint))

    assert "allow_non_private_updates" in str(reply.content.config_records["decline"]["reason"])
    assert not reply.content.array_records  # no update left the node
    assert NodeLedger(node.node.state_dir, node="hospital").entries() == []


def test_evaluate_sends_only_metrics(node, tiny_model_dir):
    fingerprint = model_dir_fingerprint(tiny_model_dir)

    reply = handle_evaluate(
        node, server_message(tiny_model_dir, fingerprint=fingerprint, kind="evaluate")
    )

    assert len(reply.content.array_records) == 0
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 6
    assert metrics["held-out-perplexity"] == pytest.approx(np.exp(metrics["held-out-loss"]))


def test_the_base_model_is_loaded_once_per_process(node, tiny_model_dir):
    fingerprint = model_dir_fingerprint(tiny_model_dir)
    handle_evaluate(node, server_message(tiny_model_dir, fingerprint=fingerprint, kind="evaluate"))
    loaded = next(iter(client_app._MODELS.values())).base.model

    handle_evaluate(node, server_message(tiny_model_dir, fingerprint=fingerprint, kind="evaluate"))

    assert len(client_app._MODELS) == 1
    assert next(iter(client_app._MODELS.values())).base.model is loaded
    assert get_peft_model_state_dict(client_app._RUNTIMES["hospital"].loaded.peft)


def test_train_instructions_survive_the_config_record():
    instructions = TrainInstructions(
        run_id="r",
        base_model_fingerprint="sha256:f",
        steps=3,
        batch_size=8,
        learning_rate=0.5,
        optimizer="sgd",
        planned_rounds=4,
        lora=LoraSettings(r=4, target_modules=["q_proj"], train_a=True),
        evaluate_local_model=False,
    )

    assert (
        TrainInstructions.from_record(ConfigRecord(dict(instructions.to_record()))) == instructions
    )


def test_a_deployed_node_sends_updates_only_through_secure_aggregation(node, tiny_model_dir):
    fingerprint = model_dir_fingerprint(tiny_model_dir)
    connection = CoordinatorConnection(
        address="127.0.0.1:9092", root_certificates=Path("ca.pem"), auth_key=Path("auth_key")
    )
    deployed = node.model_copy(update={"coordinator": connection})

    reply = handle_train(deployed, server_message(tiny_model_dir, fingerprint=fingerprint))

    assert "require_secure_aggregation" in str(reply.content.config_records["decline"]["reason"])
    assert not reply.content.array_records
    assert NodeLedger(node.node.state_dir, node="hospital").entries() == []


def test_a_later_run_spreads_what_is_left_of_the_target_over_its_rounds(node, tiny_model_dir):
    fingerprint = model_dir_fingerprint(tiny_model_dir)
    first = handle_train(
        node, server_message(tiny_model_dir, fingerprint=fingerprint, planned_rounds=2)
    )
    spent = ledger_from_content(first.content)[0].epsilon_after

    later = handle_train(
        node, server_message(tiny_model_dir, fingerprint=fingerprint, run_id="run-2")
    )

    assert 1.0 < spent < 7.0  # the first run planned two rounds and did one
    assert "decline" not in later.content.config_records
    assert ledger_from_content(later.content)[0].epsilon_after == pytest.approx(8.0, rel=2e-3)


@pytest.mark.parametrize("stated", [None, "fedtune-wire/1", "fedtune-wire/5", "fedtune-wire/7"])
def test_a_node_declines_instructions_of_another_protocol_before_training(
    node, tiny_model_dir, stated
):
    message = server_message(tiny_model_dir, fingerprint=model_dir_fingerprint(tiny_model_dir))
    config = message.content.config_records["config"]
    del config[PROTOCOL_KEY]
    if stated is not None:
        config[PROTOCOL_KEY] = stated

    reply = handle_train(node, message)

    reason = str(reply.content.config_records["decline"]["reason"])
    assert "the coordinator speaks" in reason and "same fedtune version" in reason
    assert (stated or "none stated") in reason
    assert not reply.content.array_records
    assert NodeLedger(node.node.state_dir, node="hospital").entries() == []


def second_node(tmp_path: Path, first: NodeConfig) -> NodeConfig:
    write_demo_data(tmp_path / "data", domain="bank", train=48, held_out=6)
    return first.model_copy(
        update={
            "node": NodeSettings(name="bank", state_dir=tmp_path / "state-bank"),
            "data": DataConfig(
                train=tmp_path / "data/bank/train.jsonl",
                eval=tmp_path / "data/bank/held_out.jsonl",
                max_length=160,
            ),
        }
    )


def two_rounds(nodes: list[NodeConfig], model_dir: Path) -> None:
    fingerprint = model_dir_fingerprint(model_dir)
    for server_round in (1, 2):
        for config in nodes:
            message = server_message(
                model_dir, fingerprint=fingerprint, server_round=server_round, planned_rounds=2
            )
            handle_train(config, message)


def test_a_node_evicted_from_the_runtime_cache_continues_its_ledger_exactly(
    node, tiny_model_dir, tmp_path
):
    """A simulation worker plays many nodes and keeps the runtimes of the last few: a node
    evicted between its rounds picks up its ledger (chain and epsilon) where it left it."""
    bank = second_node(tmp_path, node)
    client_app._RUNTIMES.set_limit(1)
    try:
        two_rounds([node, bank], tiny_model_dir)  # each round evicts the other node
    finally:
        client_app._RUNTIMES.set_limit(client_app.DEFAULT_CACHED_NODES)
    assert list(client_app._RUNTIMES) == ["bank"]
    evicted = NodeLedger(node.node.state_dir, node="hospital").entries()
    client_app._RUNTIMES.clear()
    alone = node.model_copy(
        update={"node": NodeSettings(name="hospital", state_dir=tmp_path / "state-alone")}
    )
    two_rounds([alone], tiny_model_dir)  # the same rounds, never evicted

    kept = NodeLedger(alone.node.state_dir, node="hospital").entries()
    assert [e.seq for e in evicted] == [e.seq for e in kept] and len(evicted) == 2
    assert evicted[1].prev_hash == evicted[0].hash
    assert [e.epsilon_after for e in evicted] == [e.epsilon_after for e in kept]
    assert evicted[1].epsilon_after > evicted[0].epsilon_after  # it accumulates


def test_a_process_playing_several_nodes_keeps_none_of_their_ledger_files_open(
    node, tiny_model_dir, tmp_path
):
    import psutil

    two_rounds([node, second_node(tmp_path, node)], tiny_model_dir)

    open_files = [f.path for f in psutil.Process().open_files()]
    assert not [path for path in open_files if path.endswith("ledger.db")], open_files
