"""A round's cost: what a node measures (tokens read without padding, device-seconds), what
its real replies carry, what the coordinator stores of them, and what it refuses of a node
that sends absurd figures (the node's word is not trusted)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from sqlalchemy import select

from fedtune.client_node import client_app
from fedtune.client_node.client_app import handle_evaluate, handle_train
from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.evaluation import evaluate
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import AdapterCheckpointer
from fedtune.coordinator.ledger_check import LedgerCheck
from fedtune.coordinator.node_costs import MAX_SECONDS, MAX_TOKENS, read_costs
from fedtune.coordinator.recorder import RunRecorder
from fedtune.coordinator.strategy import ValidatingFedAvg
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    NodeConfig,
    NodeSettings,
    PrivacySettings,
    TrainingSettings,
)
from fedtune.platform.db.storage import (
    NodeCost,
    NodeMetric,
    RejectedUpdate,
    Round,
    Run,
    open_database,
)
from fedtune.platform.model.devices import DeviceClock
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.platform.wire.messages import (
    PROTOCOL,
    PROTOCOL_KEY,
    TrainInstructions,
    arrays_to_record,
    train_reply_content,
)
from fedtune.privacy.ledger import seal_entry, sign_checkpoint
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.privacy.signing import NodeKey

LORA = LoraSettings()


def lengths(dataset) -> list[int]:
    return [len(dataset[i][0]) for i in range(len(dataset))]


# --- what the node measures ------------------------------------------------------------------


@pytest.fixture
def data(tmp_path, tiny_tokenizer):
    write_demo_data(tmp_path / "data", domain="hospital", train=24, held_out=5)
    folder = tmp_path / "data" / "hospital"
    return tuple(
        load_chat_dataset(folder / name, tiny_tokenizer, max_length=160)
        for name in ("train.jsonl", "held_out.jsonl")
    )


def test_a_round_counts_every_token_it_reads_and_no_padding(tiny_model, tiny_tokenizer, data):
    train, _ = data
    model = attach_lora(tiny_model, LORA)
    assert len(set(lengths(train))) > 1  # examples of different lengths: batches get padded

    result = train_round(
        model,
        train,
        steps=2,
        batch_size=len(train),  # one batch of every example per step
        physical_batch_size=5,
        learning_rate=0.01,
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=torch.device("cpu"),
        dp=None,
        seed=0,
        progress=False,
    )

    assert result.tokens == 2 * sum(lengths(train))
    assert 0 < result.device_seconds <= result.seconds


def test_a_private_round_counts_the_tokens_of_the_examples_it_sampled(
    tiny_model, tiny_tokenizer, data
):
    train, _ = data
    model = attach_lora(tiny_model, LORA)
    steps = 3

    result = train_round(
        model,
        train,
        steps=steps,
        batch_size=8,
        physical_batch_size=4,
        learning_rate=0.01,
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=torch.device("cpu"),
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
        seed=0,
        progress=False,
    )

    sampled = [loss for loss in result.train_losses if loss is not None]
    assert (result.tokens > 0) == bool(sampled)
    assert result.tokens <= steps * sum(lengths(train))  # each example at most once a step
    assert 0 < result.device_seconds <= result.seconds


def test_evaluation_reads_each_held_out_example_once_without_padding(
    tiny_model, tiny_tokenizer, data
):
    _, held_out = data

    result = evaluate(
        tiny_model, held_out, pad_token_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu")
    )

    assert result.tokens_read == sum(lengths(held_out))
    assert result.tokens < result.tokens_read  # the loss counts the answers' tokens only
    assert 0 < result.device_seconds <= result.seconds


def test_the_device_clock_sums_only_the_time_inside_its_blocks():
    clock = DeviceClock(torch.device("cpu"))

    with clock:
        time.sleep(0.05)
    time.sleep(0.1)
    with clock:
        time.sleep(0.05)

    assert 0.1 <= clock.seconds < 0.15


# --- real replies to the coordinator's database ----------------------------------------------


@pytest.fixture(autouse=True)
def fresh_process_cache():
    client_app._RUNTIMES.clear()
    client_app._MODELS.clear()
    yield
    client_app._RUNTIMES.clear()
    client_app._MODELS.clear()


def metadata(node_id: int, kind: str) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="sent",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=kind,
    )


def message(model_dir, arrays, *, kind: str) -> Message:
    """The coordinator's round-1 message to a node."""
    config = TrainInstructions(
        run_id="r1",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        steps=2,
        batch_size=16,
        learning_rate=0.01,
        optimizer="adamw",
        planned_rounds=1,
        lora=LORA,
        evaluate_local_model=True,
    ).to_record()
    config["server-round"] = 1
    return Message(
        content=RecordDict({"arrays": arrays, "config": config}), metadata=metadata(0, kind)
    )


def node_config(tmp_path, model_dir, name: str, **privacy) -> NodeConfig:
    write_demo_data(tmp_path / "data", domain=name, train=48, held_out=6)
    return NodeConfig(
        node=NodeSettings(name=name, state_dir=tmp_path / "state"),
        model=ModelConfig(spec=str(model_dir)),
        data=DataConfig(
            train=tmp_path / f"data/{name}/train.jsonl",
            eval=tmp_path / f"data/{name}/held_out.jsonl",
            max_length=160,
        ),
        training=TrainingSettings(physical_batch_size=8, seed=0),
        privacy=PrivacySettings(target_epsilon=8.0, **privacy),
    )


def global_adapter(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return attach_lora(AutoModelForCausalLM.from_pretrained(model_dir), LORA)


def coordinator(url: str, model, *, tmp_path, keys: dict):
    """A real recorder and strategy on ``url``, as the ServerApp builds them."""
    engine = open_database(url)
    with transaction(engine) as session:
        session.add(
            Run(
                id="r1",
                name="costs",
                status="running",
                rounds_planned=1,
                base_model_spec="tiny",
                base_model_fingerprint="sha256:x",
                config={},
            )
        )
    recorder = RunRecorder(
        engine,
        run_id="r1",
        rounds=1,
        checkpointer=AdapterCheckpointer(model, tmp_path / "adapters"),
        witness=NodeKey.generate(),
        progress=lambda line: None,
    )
    strategy = ValidatingFedAvg(
        observer=recorder,
        ledger_check=LedgerCheck(engine=engine, run_id="r1", enrolled=keys),
        min_train_nodes=1,
        min_available_nodes=1,
    )
    return strategy, engine


def costs(engine) -> dict[tuple[str, str], NodeCost]:
    with transaction(engine) as session:
        rows = session.scalars(select(NodeCost)).all()
        session.expunge_all()
    return {(row.node_name, row.phase): row for row in rows}


def test_the_costs_in_a_nodes_real_replies_reach_the_database(tmp_path, tiny_model_dir):
    node = node_config(tmp_path, tiny_model_dir, "hospital")
    model = global_adapter(tiny_model_dir)
    sent = arrays_to_record(adapter_arrays(model))
    key = NodeLedger(node.node.state_dir, node="hospital").key.public_key
    strategy, engine = coordinator(
        f"sqlite:///{tmp_path / 'fedtune.db'}", model, tmp_path=tmp_path, keys={"hospital": key}
    )
    strategy.global_arrays = sent

    trained = handle_train(node, message(tiny_model_dir, sent, kind="train"))
    evaluated = handle_evaluate(node, message(tiny_model_dir, sent, kind="evaluate"))
    strategy.aggregate_train(1, [Message(trained.content, metadata=metadata(7, "train"))])
    strategy.aggregate_evaluate(1, [Message(evaluated.content, metadata=metadata(7, "evaluate"))])

    stored = costs(engine)
    train, held_out = (r.content.metric_records["metrics"] for r in (trained, evaluated))
    row = stored[("hospital", "train")]
    assert row.train_tokens == train["train-tokens"] > 0
    assert row.evaluate_tokens == train["evaluate-tokens"] > 0  # round 1: baseline and local
    assert row.train_device_seconds == pytest.approx(train["train-device-seconds"])
    assert row.evaluate_device_seconds == pytest.approx(train["evaluate-device-seconds"])
    assert row.wall_seconds == pytest.approx(train["node-seconds"])
    assert row.train_device_seconds < row.wall_seconds and row.refused is None
    row = stored[("hospital", "evaluate")]
    assert (row.train_tokens, row.train_device_seconds) == (None, None)
    assert row.evaluate_tokens == held_out["evaluate-tokens"] > 0
    assert row.evaluate_tokens * 2 == train["evaluate-tokens"]  # the same held-out set, twice
    assert row.wall_seconds == pytest.approx(held_out["node-seconds"])
    engine.dispose()


def test_a_node_releasing_no_plain_metrics_sends_no_costs(tmp_path, tiny_model_dir):
    """Under release_metrics none (or dp) nothing about its data's lengths leaves the node."""
    node = node_config(tmp_path, tiny_model_dir, "bank", release_metrics="none")
    sent = arrays_to_record(adapter_arrays(global_adapter(tiny_model_dir)))

    reply = handle_train(node, message(tiny_model_dir, sent, kind="train"))

    assert dict(reply.content.metric_records["metrics"]) == {"num-examples": 48}
    assert read_costs(reply.content.metric_records["metrics"]).train_tokens is None


# --- a node that lies ------------------------------------------------------------------------


def signed_reply(node_id: int, name: str, key: NodeKey, arrays, metrics: dict) -> Message:
    entry = seal_entry(
        {
            "node": name,
            "run_id": "r1",
            "round": 1,
            "base_model_fingerprint": "sha256:x",
            "data_fingerprint": "sha256:d",
            "mode": "dp",
            "steps": 2,
            "sample_rate": 0.1,
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
            "delta": 1e-5,
            "epsilon_round": 1.0,
            "epsilon_after": 1.0,
            "epsilon_cap": 8.0,
            "accountant": "rdp",
            "accountant_version": "opacus-1.6.0",
            "kind": "training_round",
            "method": "dp-sgd",
            "privacy_unit": "example",
        },
        previous=None,
        key=key,
    )
    content = train_reply_content(
        arrays=arrays,
        metrics=metrics,
        identity=ConfigRecord({"name": name, PROTOCOL_KEY: PROTOCOL}),
        budget={"target_epsilon": 8.0, "planned_rounds": 1},
        ledger=(entry, sign_checkpoint(node=name, head=entry, key=key)),
    )
    return Message(content=content, metadata=metadata(node_id, "train"))


ABSURD = {
    "negative": {"train-tokens": -5, "train-device-seconds": -1.0, "node-seconds": -3.0},
    "not finite": {"train-device-seconds": math.nan, "evaluate-device-seconds": math.inf},
    "huge": {"train-tokens": 2**62, "evaluate-tokens": MAX_TOKENS + 1, "node-seconds": 1e308},
    "wrong type": {"train-tokens": 12.5, "evaluate-tokens": [1, 2], "node-seconds": [0.5]},
}
COLUMNS = {
    "train-tokens": "train_tokens",
    "evaluate-tokens": "evaluate_tokens",
    "train-device-seconds": "train_device_seconds",
    "evaluate-device-seconds": "evaluate_device_seconds",
    "node-seconds": "wall_seconds",
}


@pytest.mark.parametrize("kind", sorted(ABSURD))
def test_absurd_figures_are_refused_without_failing_the_round(
    kind, database_url, tmp_path, tiny_model
):
    model = attach_lora(tiny_model, LORA)
    arrays = adapter_arrays(model)
    keys = {"honest": NodeKey.generate(), "liar": NodeKey.generate()}
    strategy, engine = coordinator(
        database_url, model, tmp_path=tmp_path, keys={n: k.public_key for n, k in keys.items()}
    )
    strategy.global_arrays = arrays_to_record(arrays)
    honest = {"num-examples": 10, "train-loss": 1.0, "train-tokens": 4000, "node-seconds": 2.0}
    lying = {"num-examples": 10, "train-loss": 1.0, "train-tokens": 4000, **ABSURD[kind]}
    evaluated = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": 8, "held-out-loss": 1.0, **ABSURD[kind]}),
            "node": ConfigRecord({"name": "liar"}),
        }
    )

    aggregate, _ = strategy.aggregate_train(
        1,
        [
            signed_reply(1, "honest", keys["honest"], arrays, honest),
            signed_reply(2, "liar", keys["liar"], arrays, lying),
        ],
    )
    strategy.aggregate_evaluate(1, [Message(evaluated, metadata=metadata(2, "evaluate"))])

    assert aggregate is not None  # the liar's update still counts: its figures are not data
    stored = costs(engine)
    assert stored[("honest", "train")].train_tokens == 4000
    assert stored[("honest", "train")].refused is None
    for phase in ("train", "evaluate"):
        row = stored[("liar", phase)]
        for name in ABSURD[kind]:
            assert getattr(row, COLUMNS[name]) is None, (phase, name)
            assert name in (row.refused or ""), (phase, name)
        kept = [getattr(row, column) for column in COLUMNS.values()]
        assert all(0 <= v <= max(MAX_TOKENS, MAX_SECONDS) for v in kept if v is not None)
    with transaction(engine) as session:
        assert session.scalars(select(Round.number)).all() == [1]  # the round was committed
        assert len(session.scalars(select(NodeMetric)).all()) == 3
    engine.dispose()


@pytest.mark.parametrize("weight", [0, -4, 2**40, [8, 8], 8.5])
def test_an_evaluate_reply_with_an_unusable_weight_is_rejected_not_fatal(
    weight, database_url, tmp_path, tiny_model
):
    model = attach_lora(tiny_model, LORA)
    strategy, engine = coordinator(database_url, model, tmp_path=tmp_path, keys={})
    replies = [
        Message(
            RecordDict(
                {
                    "metrics": MetricRecord({"num-examples": w, "held-out-loss": 1.0}),
                    "node": ConfigRecord({"name": name}),
                }
            ),
            metadata=metadata(node_id, "evaluate"),
        )
        for node_id, name, w in ((1, "honest", 8), (2, "liar", weight))
    ]

    metrics = strategy.aggregate_evaluate(1, replies)

    assert metrics is not None and metrics["held-out-loss"] == pytest.approx(1.0)
    with transaction(engine) as session:
        counts = {m.node_name: m.num_examples for m in session.scalars(select(NodeMetric))}
        refused = session.scalars(select(RejectedUpdate.node_name)).all()
    if isinstance(weight, int) and weight > 0:  # usable, but past an INTEGER column: kept as 0
        assert counts == {"honest": 8, "liar": 0}
    else:
        assert counts == {"honest": 8} and refused == ["liar"]
    engine.dispose()
