"""The coordinator's strategy: weighted FedAvg of the replies it can trust, and a stored
reason for every reply it leaves out."""

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from sqlalchemy import select

from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import AdapterCheckpointer
from fedtune.coordinator.ledger_check import LedgerCheck
from fedtune.coordinator.recorder import RunRecorder
from fedtune.coordinator.strategy import ValidatingFedAvg
from fedtune.platform.config import LoraSettings
from fedtune.platform.db.storage import (
    AdapterCheckpoint,
    HealthAlert,
    HealthSignal,
    NodeMetric,
    RejectedUpdate,
    Round,
    Run,
    open_database,
)
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.platform.wire.messages import (
    PROTOCOL,
    PROTOCOL_KEY,
    arrays_to_record,
    decline_content,
    train_reply_content,
)
from fedtune.privacy.ledger import (
    V1_PAYLOAD_FIELDS,
    LedgerEntry,
    entry_hash,
    seal_entry,
    sign_checkpoint,
)
from fedtune.privacy.ledger_store import LedgerEntryRow
from fedtune.privacy.signing import NodeKey

NAMES = ["node-1", "node-2", "node-3", "hospital", "wrong-shape", "missing-key", "nan", "inf"]
KEYS = {name: NodeKey.generate() for name in NAMES}


def reply_metadata(node_id: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="sent",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )


def signed_round(name: str, key: NodeKey) -> tuple:
    """What a node's ledger holds after its first round: the entry and the signed head."""
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
    return entry, sign_checkpoint(node=name, head=entry, key=key)


def reply(
    node_id: int, arrays: dict, examples: int, name: str | None = None, key: NodeKey | None = None
) -> Message:
    name = name or f"node-{node_id}"
    content = train_reply_content(
        arrays=arrays,
        metrics={"num-examples": examples, "train-loss": 1.0},
        identity=ConfigRecord({"name": name, PROTOCOL_KEY: PROTOCOL}),
        budget={"target_epsilon": 8.0, "planned_rounds": 3},
        ledger=signed_round(name, key or KEYS.get(name) or NodeKey.generate()),
    )
    return Message(content=content, metadata=reply_metadata(node_id))


@pytest.fixture
def setting(tmp_path, tiny_model):
    """A real recorder on SQLite and a real PEFT checkpointer, as the ServerApp builds them."""
    torch.manual_seed(0)
    model = attach_lora(tiny_model, LoraSettings(train_a=True))
    global_arrays = adapter_arrays(model)
    engine = open_database(f"sqlite:///{tmp_path / 'fedtune.db'}")
    with transaction(engine) as session:
        session.add(
            Run(
                id="r1",
                name="test",
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
    check = LedgerCheck(
        engine=engine, run_id="r1", enrolled={n: k.public_key for n, k in KEYS.items()}
    )
    strategy = ValidatingFedAvg(
        observer=recorder, ledger_check=check, min_train_nodes=1, min_available_nodes=1
    )
    strategy.global_arrays = arrays_to_record(global_arrays)
    return strategy, engine, global_arrays


def shifted(arrays: dict, by: float) -> dict:
    return {name: value + by for name, value in arrays.items()}


def test_aggregate_equals_the_example_weighted_mean(setting):
    strategy, _, global_arrays = setting
    rng = np.random.default_rng(0)
    updates = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in global_arrays.items()}
        for _ in range(3)
    ]
    examples = [10, 30, 60]

    aggregate, _ = strategy.aggregate_train(
        1, [reply(i + 1, u, n) for i, (u, n) in enumerate(zip(updates, examples, strict=True))]
    )

    total = sum(examples)
    for name in global_arrays:
        expected = sum(
            u[name].astype(np.float64) * n / total for u, n in zip(updates, examples, strict=True)
        )
        np.testing.assert_allclose(aggregate[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_bad_updates_are_dropped_with_a_stored_reason_and_the_round_completes(setting):
    strategy, engine, global_arrays = setting
    good = shifted(global_arrays, 0.5)
    name = next(iter(global_arrays))
    wrong_shape = {**good, name: np.zeros((3, 3), dtype=np.float32)}
    missing_key = {k: v for k, v in good.items() if k != name}
    with_nan = {**good, name: np.full_like(good[name], np.nan)}
    with_inf = {**good, name: np.full_like(good[name], np.inf)}
    failed = Message(error=Error(code=3, reason="out of memory"), metadata=reply_metadata(7))
    declined = Message(
        content=decline_content(
            identity=ConfigRecord({"name": "bank"}), reason="would pass epsilon 8"
        ),
        metadata=reply_metadata(8),
    )

    aggregate, _ = strategy.aggregate_train(
        1,
        [
            reply(1, good, 10, "hospital"),
            reply(2, wrong_shape, 10, "wrong-shape"),
            reply(3, missing_key, 10, "missing-key"),
            reply(4, with_nan, 10, "nan"),
            reply(5, with_inf, 10, "inf"),
            failed,
            declined,
        ],
    )
    strategy.aggregate_evaluate(1, [])

    for key in global_arrays:
        np.testing.assert_allclose(aggregate[key].numpy(), good[key], rtol=1e-6)
    with transaction(engine) as session:
        reasons = {(r.node_name, r.kind): r.reason for r in session.scalars(select(RejectedUpdate))}
        round_row = session.scalars(select(Round)).one()
        checkpoint = session.scalars(select(AdapterCheckpoint)).one()
        trained = session.scalars(select(NodeMetric)).all()
    assert "shape (3, 3)" in reasons[("wrong-shape", "rejected")]
    assert "missing" in reasons[("missing-key", "rejected")]
    assert "non-finite" in reasons[("nan", "rejected")]
    assert "non-finite" in reasons[("inf", "rejected")]
    assert "out of memory" in reasons[(None, "failed")]
    assert "would pass epsilon 8" in reasons[("bank", "declined")]
    assert (round_row.updates_accepted, round_row.updates_rejected) == (1, 6)
    assert checkpoint.round == 1 and len(checkpoint.sha256) == 64
    assert [m.node_name for m in trained] == ["hospital"]


def test_a_round_with_no_usable_update_keeps_the_global_adapter(setting):
    strategy, engine, global_arrays = setting
    name = next(iter(global_arrays))

    aggregate, _ = strategy.aggregate_train(
        1, [reply(1, {**global_arrays, name: np.zeros((1,), dtype=np.float32)}, 5)]
    )
    strategy.aggregate_evaluate(1, [])

    assert aggregate is None
    with transaction(engine) as session:
        assert session.scalars(select(AdapterCheckpoint)).all() == []
        assert session.scalars(select(Round)).one().updates_accepted == 0


def test_a_ledger_entry_not_signed_by_the_enrolled_key_is_refused(setting):
    strategy, engine, global_arrays = setting
    update = shifted(global_arrays, 0.5)

    aggregate, _ = strategy.aggregate_train(
        1,
        [
            reply(1, update, 10, "hospital"),
            reply(2, update, 10, "node-2", key=NodeKey.generate()),
            reply(3, update, 10, "stranger"),
        ],
    )
    strategy.aggregate_evaluate(1, [])

    assert aggregate is not None
    with transaction(engine) as session:
        reasons = {r.node_name: r.reason for r in session.scalars(select(RejectedUpdate))}
        stored = [row.node for row in session.scalars(select(LedgerEntryRow))]
    assert "signature does not match" in reasons["node-2"]
    assert "not enrolled" in reasons["stranger"]
    assert stored == ["hospital"]


def test_a_new_entry_in_the_old_format_is_refused(setting):
    strategy, engine, global_arrays = setting
    key = KEYS["node-1"]
    entry, _ = signed_round("node-1", key)
    payload = {name: value for name, value in entry.payload().items() if name in V1_PAYLOAD_FIELDS}
    digest = entry_hash(payload)
    old = LedgerEntry(**payload, hash=digest, signature=key.sign(bytes.fromhex(digest)))
    message = reply(1, shifted(global_arrays, 0.5), 10, "node-1")
    message.content.config_records["ledger"] = ConfigRecord(
        {
            "entry": json.dumps(old.to_dict()),
            "checkpoint": json.dumps(sign_checkpoint(node="node-1", head=old, key=key).to_dict()),
        }
    )

    aggregate, _ = strategy.aggregate_train(1, [message])
    strategy.aggregate_evaluate(1, [])

    assert aggregate is None
    with transaction(engine) as session:
        reason = session.scalars(select(RejectedUpdate.reason)).one()
    assert "its format is version 1, not fedtune-entry/2" in reason


@pytest.mark.parametrize(
    "stated",
    [None, "fedtune-wire/1", "fedtune-wire/5", "fedtune-wire/7", "x" * 100_000],
    ids=["none", "wire-1", "wire-4", "wire-6", "100k-chars"],
)
def test_a_reply_in_another_protocol_is_refused_naming_both(setting, stated):
    strategy, engine, global_arrays = setting
    other = reply(2, shifted(global_arrays, 5.0), 10, "node-2")
    identity = other.content.config_records["node"]
    del identity[PROTOCOL_KEY]
    if stated is not None:
        identity[PROTOCOL_KEY] = stated

    aggregate, _ = strategy.aggregate_train(
        1, [reply(1, shifted(global_arrays, 0.5), 10, "node-1"), other]
    )
    strategy.aggregate_evaluate(1, [])

    assert aggregate is not None  # node-1's update alone
    first = next(iter(global_arrays))
    np.testing.assert_allclose(aggregate[first].numpy(), global_arrays[first] + 0.5, rtol=1e-6)
    with transaction(engine) as session:
        reason = session.scalars(select(RejectedUpdate.reason)).one()
        stored = [row.node for row in session.scalars(select(LedgerEntryRow))]
    assert f"node node-2 speaks {repr(stated)[:37] if stated else 'fedtune-wire/1'}" in reason
    assert len(reason) < 300  # a node's own text is cut short before it is stored
    assert PROTOCOL in reason and "same fedtune version" in reason
    assert stored == ["node-1"]  # nothing of the other protocol's reply is kept


def test_a_verified_ledger_entry_is_stored_even_when_its_update_is_rejected(setting):
    strategy, engine, global_arrays = setting
    name = next(iter(global_arrays))
    with_nan = {**global_arrays, name: np.full_like(global_arrays[name], np.nan)}

    strategy.aggregate_train(1, [reply(4, with_nan, 10, "nan")])
    strategy.aggregate_evaluate(1, [])

    with transaction(engine) as session:
        row = session.scalars(select(LedgerEntryRow)).one()
        rejected = session.scalars(select(RejectedUpdate)).one()
    assert (row.node, row.seq, row.epsilon_after) == ("nan", 1, 1.0)
    assert "non-finite" in rejected.reason


def evaluate_reply(node_id: int, loss: float) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": 8, "held-out-loss": loss}),
            "node": ConfigRecord({"name": f"node-{node_id}"}),
        }
    )
    return Message(content=content, metadata=reply_metadata(node_id))


def alerts(engine) -> dict:
    with transaction(engine) as session:
        return {(a.kind, a.node_name): a.message for a in session.scalars(select(HealthAlert))}


def test_an_update_a_hundred_times_larger_raises_an_outlier_alert(setting):
    strategy, engine, global_arrays = setting
    rng = np.random.default_rng(1)
    steps = [
        {
            k: rng.normal(scale=0.01, size=v.shape).astype(np.float32)
            for k, v in global_arrays.items()
        }
        for _ in range(3)
    ]
    steps[2] = {k: v * 100 for k, v in steps[2].items()}
    updates = [{k: global_arrays[k] + step[k] for k in global_arrays} for step in steps]

    strategy.aggregate_train(1, [reply(i + 1, u, 10) for i, u in enumerate(updates)])
    strategy.aggregate_evaluate(1, [])

    with transaction(engine) as session:
        ratios = {
            s.node_name: s.value
            for s in session.scalars(
                select(HealthSignal).where(HealthSignal.signal == "update-norm-ratio")
            )
        }
    assert ratios["node-3"] > 50 and ratios["node-1"] < 2
    assert set(alerts(engine)) == {("outlier-update", "node-3")}


def test_a_nan_update_raises_a_non_finite_alert(setting):
    strategy, engine, global_arrays = setting
    name = next(iter(global_arrays))
    with_nan = {**global_arrays, name: np.full_like(global_arrays[name], np.nan)}

    strategy.aggregate_train(
        1, [reply(1, shifted(global_arrays, 0.1), 10), reply(4, with_nan, 10, "nan")]
    )
    strategy.aggregate_evaluate(1, [])

    assert "non-finite" in alerts(engine)[("non-finite", "nan")]


def test_a_global_loss_rising_two_rounds_in_a_row_raises_an_alert(setting):
    strategy, engine, global_arrays = setting

    for server_round, loss in enumerate([2.0, 2.1, 2.2], start=1):
        strategy.aggregate_train(server_round, [reply(1, shifted(global_arrays, 0.1), 10)])
        strategy.aggregate_evaluate(server_round, [evaluate_reply(1, loss)])

    with transaction(engine) as session:
        raised = session.scalars(select(HealthAlert).where(HealthAlert.kind == "loss-rising")).all()
        curve = session.scalars(
            select(HealthSignal)
            .where(HealthSignal.signal == "held-out-loss", HealthSignal.node_name.is_(None))
            .order_by(HealthSignal.round)
        ).all()
    assert [a.round for a in raised] == [3]
    assert "2.000 -> 2.100 -> 2.200" in raised[0].message
    assert [s.value for s in curve] == pytest.approx([2.0, 2.1, 2.2])


def reply_recording(method: str, unit: str, arrays: dict) -> RecordDict:
    """hospital's train reply whose signed entry records ``method`` over ``unit``."""
    key = KEYS["hospital"]
    entry, _ = signed_round("hospital", key)
    payload = {k: v for k, v in entry.payload().items() if k not in ("seq", "prev_hash")}
    entry = seal_entry({**payload, "method": method, "privacy_unit": unit}, previous=None, key=key)
    return train_reply_content(
        arrays=arrays,
        metrics={"num-examples": 10, "train-loss": 1.0},
        identity=ConfigRecord({"name": "hospital", PROTOCOL_KEY: PROTOCOL}),
        budget={"target_epsilon": 8.0, "planned_rounds": 3},
        ledger=(entry, sign_checkpoint(node="hospital", head=entry, key=key)),
    )


@pytest.mark.parametrize(
    ("run_method", "honest", "forged"),
    [
        ("dpo", ("dp-dpo", "preference_pair"), ("dp-sgd", "example")),
        ("sft", ("dp-sgd", "example"), ("dp-dpo", "preference_pair")),
        ("grpo", ("dp-grpo-seeded-noise", "prompt"), ("dp-sgd", "example")),
    ],
)
def test_a_ledger_entry_of_another_training_method_than_the_run_s_is_refused(
    setting, run_method, honest, forged
):
    """A node in a DPO run that records its round as DP-SGD over examples (or the reverse)
    misstates whose privacy its epsilon is about: the coordinator keeps no such entry."""
    _, engine, global_arrays = setting
    check = LedgerCheck(
        engine=engine,
        run_id="r1",
        enrolled={"hospital": KEYS["hospital"].public_key},
        training_method=run_method,
    )

    refused, reason = check(1, "hospital", reply_recording(*forged, global_arrays))
    kept, no_reason = check(1, "hospital", reply_recording(*honest, global_arrays))

    assert refused is None
    assert reason == (
        f"ledger entry refused: it records method {forged[0]!r}, and this run trains "
        f"with {run_method!r}"
    )
    assert kept is not None and no_reason is None
