"""Secure-aggregation rounds as the coordinator and the nodes see them: the message shapes
SecAgg+ needs, and :class:`SecureFedAvg` keeping the unmasked mean only when every reply in it
verifies. (The protocol itself runs over real processes in test_deployment.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres

from fedtune.coordinator.ledger_check import LedgerCheck
from fedtune.coordinator.secure_aggregation import SecureFedAvg
from fedtune.platform.config import LoraSettings, NodeLevelDP
from fedtune.platform.db.storage import open_database
from fedtune.platform.wire.messages import (
    CONFIG,
    METRICS,
    SERVER_ROUND,
    TrainInstructions,
    arrays_to_record,
    decline_content,
    node_identity,
    train_reply_content,
)
from fedtune.platform.wire.packed_arrays import ArrayLayout
from fedtune.platform.wire.secure_messages import (
    REPLY_KEY,
    SecureMessageError,
    SecureTrain,
    secure_reply_from_train_reply,
    secure_train_config,
    train_content_from_secure,
    train_reply_from_secure_metrics,
)
from fedtune.privacy.accounting import BudgetExhaustedError, epsilon_of
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.privacy.node_level_dp import NodeLevelPrivacy
from fedtune.privacy.signing import load_public_key

KEYS = ["layer.lora_A.weight", "layer.lora_B.weight"]
GLOBAL = {KEYS[0]: np.full((2, 4), 0.5, np.float32), KEYS[1]: np.zeros((4, 2), np.float32)}
LAYOUT = ArrayLayout.of(GLOBAL)
INSTRUCTIONS = TrainInstructions(
    run_id="run-1",
    base_model_fingerprint="sha256:base",
    steps=2,
    batch_size=8,
    learning_rate=0.01,
    optimizer="adamw",
    planned_rounds=3,
    lora=LoraSettings(),
    evaluate_local_model=False,
)


class _Proxy:
    def __init__(self, node_id: int):
        self.node_id = node_id


class _Observer:
    def __init__(self):
        self.trained = []

    def on_train(self, server_round, outcomes, aggregate, metrics, sent):
        self.trained.append((server_round, outcomes, aggregate, metrics))

    def on_evaluate(self, server_round, outcomes, metrics):
        pass


def node_reply(ledger: NodeLedger, name: str, *, server_round: int, examples: int, shift: float):
    entry, checkpoint = ledger.append(
        {
            "run_id": "run-1",
            "round": server_round,
            "base_model_fingerprint": "sha256:base",
            "data_fingerprint": f"sha256:{name}",
            "mode": "dp",
            "steps": 2,
            "sample_rate": 0.1,
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
            "delta": 1e-5,
            "epsilon_round": 0.5,
            "epsilon_after": 0.5,
            "epsilon_cap": 8.0,
            "accountant": "rdp",
            "accountant_version": "test",
            "kind": "training_round",
            "method": "dp-sgd",
            "privacy_unit": "example",
        }
    )
    arrays = {key: value + shift for key, value in GLOBAL.items()}
    return train_reply_content(
        arrays=arrays,
        metrics={"num-examples": examples, "train-loss": 1.0 + shift},
        identity=node_identity(
            name=name, base_model_fingerprint="sha256:base", data_fingerprint=f"sha256:{name}"
        ),
        budget={"target_epsilon": 8.0, "planned_rounds": 1},
        ledger=(entry, checkpoint),
    ), arrays


def request(*, clipping_norm: float | None = None) -> SecureTrain:
    """The secure train message a node received: the global adapter in key order."""
    config = secure_train_config(
        INSTRUCTIONS, server_round=1, layout=LAYOUT, clipping_norm=clipping_norm
    )
    fitins = FitIns(ndarrays_to_parameters([LAYOUT.flatten(GLOBAL)]), dict(config))
    return train_content_from_secure(fitins_to_recorddict(fitins, keep_input=True))


def as_fitres(reply: RecordDict, *, clipping_norm: float | None = None) -> FitRes:
    content = secure_reply_from_train_reply(reply, request(clipping_norm=clipping_norm))
    return recorddict_to_fitres(content, keep_input=True)


@pytest.fixture
def nodes(tmp_path):
    return {name: NodeLedger(tmp_path / name, node=name) for name in ("a", "b")}


@pytest.fixture
def strategy(tmp_path, nodes):
    engine = open_database(f"sqlite:///{tmp_path / 'coordinator.db'}")
    keys = {name: load_public_key(ledger.key.public_key_text()) for name, ledger in nodes.items()}
    observer = _Observer()
    secure = SecureFedAvg(
        instructions=INSTRUCTIONS,
        global_arrays=arrays_to_record(GLOBAL),
        observer=observer,
        ledger_check=LedgerCheck(engine=engine, run_id="run-1", enrolled=keys),
        min_nodes=2,
    )
    secure.sampled = ["1", "2"]
    return secure, observer


def arrays_of(parameters: Parameters) -> dict[str, np.ndarray]:
    """The named arrays of a secure message's one vector."""
    (vector,) = parameters_to_ndarrays(parameters)
    return LAYOUT.split(vector)


def with_mean(fitres: FitRes, mean: dict[str, np.ndarray]) -> FitRes:
    """What SecAgg+ hands the strategy: every result carries the unmasked mean."""
    fitres.parameters = ndarrays_to_parameters([LAYOUT.flatten(mean)])
    return fitres


def test_a_secure_train_message_carries_the_instructions_and_the_arrays_in_order():
    received = request()

    assert received.layout.names == tuple(KEYS)
    assert received.clipping_norm is None
    config = received.content.config_records[CONFIG]
    assert TrainInstructions.from_record(config) == INSTRUCTIONS
    assert config[SERVER_ROUND] == 1
    assert all(np.array_equal(received.sent[k], GLOBAL[k]) for k in KEYS)


def test_a_secure_reply_sends_the_update_for_masking_and_the_rest_beside_it(nodes):
    reply, arrays = node_reply(nodes["a"], "a", server_round=1, examples=40, shift=0.25)

    fitres = as_fitres(reply)

    assert fitres.num_examples == 40
    (sent,) = parameters_to_ndarrays(fitres.parameters)  # the whole adapter, one vector
    assert np.array_equal(sent, np.concatenate([arrays[k].ravel() for k in KEYS]))
    unpacked = train_reply_from_secure_metrics(fitres.metrics)
    assert not unpacked.array_records
    assert unpacked.metric_records[METRICS]["num-examples"] == 40
    assert "ledger" in unpacked.config_records


def test_a_declining_node_sends_zeros_with_weight_zero():
    identity = node_identity(name="a", base_model_fingerprint="x", data_fingerprint="y")
    reply = decline_content(identity=identity, reason="budget")

    fitres = as_fitres(reply)

    assert fitres.num_examples == 0
    assert all(not value.any() for value in parameters_to_ndarrays(fitres.parameters))
    assert "decline" in train_reply_from_secure_metrics(fitres.metrics).config_records


@pytest.mark.parametrize(
    "metrics, problem",
    [({}, "carries no"), ({REPLY_KEY: b"\x00garbage\xff"}, "cannot be read")],
)
def test_a_malformed_secure_reply_is_refused_with_its_reason(metrics, problem):
    with pytest.raises(SecureMessageError, match=problem):
        train_reply_from_secure_metrics(metrics)


def test_a_reply_smuggling_arrays_beside_the_masked_update_is_refused(nodes):
    reply, _ = node_reply(nodes["a"], "a", server_round=1, examples=40, shift=0.25)
    from flwr.common.serde import recorddict_to_proto

    packed = recorddict_to_proto(
        RecordDict({"arrays": reply.array_records["arrays"]})
    ).SerializeToString()
    with pytest.raises(SecureMessageError, match="arrays outside secure aggregation"):
        train_reply_from_secure_metrics({REPLY_KEY: packed})


def test_the_mean_becomes_the_global_adapter_when_every_reply_verifies(strategy, nodes):
    secure, observer = strategy
    reply_a, arrays_a = node_reply(nodes["a"], "a", server_round=1, examples=30, shift=0.1)
    reply_b, arrays_b = node_reply(nodes["b"], "b", server_round=1, examples=10, shift=0.5)
    mean = {k: (30 * arrays_a[k] + 10 * arrays_b[k]) / 40 for k in KEYS}
    results = [
        (_Proxy(1), with_mean(as_fitres(reply_a), mean)),
        (_Proxy(2), with_mean(as_fitres(reply_b), mean)),
    ]

    parameters, _ = secure.aggregate_fit(1, results, [])

    assert parameters is not None
    returned = arrays_of(parameters)
    assert all(np.allclose(returned[k], mean[k]) for k in KEYS)
    ((_, outcomes, aggregate, metrics),) = observer.trained
    assert sorted(o.kind for o in outcomes) == ["accepted", "accepted"]
    assert aggregate is not None
    assert metrics["train-loss"] == pytest.approx((30 * 1.1 + 10 * 1.5) / 40)


def test_a_mean_holding_an_unverified_update_is_discarded_with_the_reason(
    strategy, nodes, tmp_path
):
    secure, observer = strategy
    reply_a, arrays_a = node_reply(nodes["a"], "a", server_round=1, examples=30, shift=0.1)
    impostor = NodeLedger(tmp_path / "impostor", node="b")  # signs as b with another key
    reply_b, arrays_b = node_reply(impostor, "b", server_round=1, examples=10, shift=0.5)
    mean = {k: (30 * arrays_a[k] + 10 * arrays_b[k]) / 40 for k in KEYS}
    results = [
        (_Proxy(1), with_mean(as_fitres(reply_a), mean)),
        (_Proxy(2), with_mean(as_fitres(reply_b), mean)),
    ]

    parameters, _ = secure.aggregate_fit(1, results, [])

    assert parameters is None
    ((_, outcomes, aggregate, _),) = observer.trained
    assert aggregate is None
    assert all(o.kind == "rejected" for o in outcomes)
    assert any("cannot be removed" in (o.reason or "") for o in outcomes if o.node_name == "a")
    assert any("signature" in (o.reason or "") for o in outcomes if o.node_name == "b")
    assert secure.global_arrays[KEYS[0]].numpy().tolist() == GLOBAL[KEYS[0]].tolist()


def test_a_node_that_dropped_out_is_recorded_as_failed(strategy, nodes):
    secure, observer = strategy
    reply_a, arrays_a = node_reply(nodes["a"], "a", server_round=1, examples=30, shift=0.1)
    results = [(_Proxy(1), with_mean(as_fitres(reply_a), arrays_a))]

    parameters, _ = secure.aggregate_fit(1, results, [Exception("node 2 timed out")])

    assert parameters is not None
    ((_, outcomes, _, _),) = observer.trained
    failed = [o for o in outcomes if o.kind == "failed"]
    assert [o.flower_node_id for o in failed] == ["2"]
    assert "timed out" in (failed[0].reason or "")


def test_secure_aggregation_refuses_fewer_than_two_nodes():
    with pytest.raises(ValueError, match="at least 2 nodes"):
        SecureFedAvg(
            instructions=INSTRUCTIONS,
            global_arrays=arrays_to_record(GLOBAL),
            observer=_Observer(),
            ledger_check=None,  # type: ignore[arg-type]
            min_nodes=1,
        )


def test_under_node_level_dp_a_node_clips_its_update_and_weighs_one(nodes):
    reply, arrays = node_reply(nodes["a"], "a", server_round=1, examples=40, shift=0.25)

    fitres = as_fitres(reply, clipping_norm=0.1)

    sent = arrays_of(fitres.parameters)
    update = np.concatenate([(sent[k] - GLOBAL[k]).ravel() for k in KEYS])
    original = np.concatenate([(arrays[k] - GLOBAL[k]).ravel() for k in KEYS])
    assert np.linalg.norm(update) == pytest.approx(0.1, rel=1e-5)
    assert np.allclose(update / np.linalg.norm(update), original / np.linalg.norm(original))
    assert fitres.num_examples == 1


def node_level(tmp_path, **settings) -> NodeLevelPrivacy:
    return NodeLevelPrivacy(
        NodeLevelDP(clipping_norm=0.1, noise_multiplier=1.0, **settings),
        run_id="run-1",
        population=2,
        ledger=NodeLedger(tmp_path / "node-level", node="coordinator"),
    )


def test_node_level_dp_noises_the_mean_and_records_its_epsilon(strategy, nodes, tmp_path):
    secure, observer = strategy
    secure.node_dp = node_level(tmp_path)
    reply_a, _ = node_reply(nodes["a"], "a", server_round=1, examples=30, shift=0.1)
    reply_b, _ = node_reply(nodes["b"], "b", server_round=1, examples=10, shift=0.5)
    fitres = [as_fitres(r, clipping_norm=0.1) for r in (reply_a, reply_b)]
    mean = {k: np.mean([arrays_of(f.parameters)[k] for f in fitres], axis=0) for k in KEYS}
    results = [(_Proxy(n + 1), with_mean(f, mean)) for n, f in enumerate(fitres)]

    parameters, _ = secure.aggregate_fit(1, results, [])

    noised = arrays_of(parameters)
    assert not any(np.allclose(noised[k], mean[k]) for k in KEYS)
    ((_, _, _, metrics),) = observer.trained
    (entry,) = secure.node_dp.ledger.entries()
    assert entry.node == "coordinator" and entry.noise_multiplier == 1.0
    assert metrics["node-level-epsilon"] == pytest.approx(entry.epsilon_after)
    assert entry.epsilon_after == pytest.approx(
        epsilon_of([(1.0, 1.0, 1)], delta=1e-5, accountant="rdp"), rel=0.02
    )


def test_node_level_dp_refuses_a_round_past_its_budget(tmp_path):
    privacy = node_level(tmp_path, max_epsilon=0.5)

    with pytest.raises(BudgetExhaustedError, match=r"max_epsilon 0\.5"):
        privacy.check_round()
