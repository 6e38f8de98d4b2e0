"""The node's guard in front of Flower's secaggplus_mod: Flower's own SecAggPlusWorkflow drives
the nodes' mods in this process (an in-process grid stands in for SuperLink and SuperNodes);
an honest round gives the weighted mean, and each message a malicious coordinator could send
instead is refused with its reason, with nothing secret in the reply."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client_node.secagg_guard import guarded_secaggplus_mod, make_guarded_secaggplus_mod
from fedtune.platform.wire import secagg_masks

Tamper = Callable[[str, int, ConfigRecord, "InProcessGrid"], None]


@pytest.fixture(autouse=True)
def strong_masks(monkeypatch):
    """install() for one test; afterwards every module holds what it held before."""
    for module in list(sys.modules.values()):
        if "pseudo_rand_gen" in getattr(module, "__dict__", {}):
            monkeypatch.setattr(module, "pseudo_rand_gen", module.pseudo_rand_gen)
    secagg_masks.install()


@pytest.fixture(autouse=True)
def server_app_identity(monkeypatch):
    """Flower's Message reads the sending task's identity (set by flwr-serverapp)."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def update_of(node: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, 12, dtype=np.float32) * (node % 7) - 0.25


def weight_of(node: int) -> int:
    return 10 + node % 5


class InProcessGrid:
    """What the SuperLink and SuperNodes do for the workflow, here: each message is copied (as
    the transport would), may be altered by ``tamper`` (a malicious coordinator), and is
    answered by ``mod`` with the node's own Context; nodes in ``leave`` do not answer that
    stage."""

    def __init__(
        self,
        nodes: list[int],
        mod=guarded_secaggplus_mod,
        *,
        tamper: Tamper | None = None,
        leave: tuple[tuple[str, int], ...] = (),
    ):
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            for node in nodes
        }
        self.mod = mod
        self.tamper = tamper
        self.leave = leave
        self.replies: list[tuple[str, int, Message]] = []
        self.trained: list[int] = []
        self.count = 0

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for sent in messages:
            message = copy.deepcopy(sent)
            self.count += 1
            message.metadata.__dict__["_message_id"] = f"message-{self.count}"
            node = message.metadata.dst_node_id
            configs = message.content.config_records[RECORD_KEY_CONFIGS]
            stage = str(configs[Key.STAGE])
            if (stage, node) in self.leave:
                continue
            if self.tamper is not None:
                self.tamper(stage, node, configs, self)
            reply = self.deliver(message)
            self.replies.append((stage, node, reply))
            replies.append(reply)
        return replies

    def deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        return self.mod(message, self.contexts[node], self._trainer(node))

    def state(self, node: int) -> SecAggPlusState:
        return SecAggPlusState(**dict(self.contexts[node].state.config_records[RECORD_KEY_STATE]))

    def stage_replies(self, stage: str) -> list[Message]:
        return [reply for sent, _, reply in self.replies if sent == stage]

    def _trainer(self, node: int):
        def train(message: Message, context: Context) -> Message:
            self.trained.append(node)
            fitres = FitRes(
                Status(Code.OK, ""), ndarrays_to_parameters([update_of(node)]), weight_of(node), {}
            )
            return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)

        return train


class RecordingFedAvg(FedAvg):
    def __init__(self, nodes: int):
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_available_clients=nodes,
        )
        self.mean: np.ndarray | None = None

    def aggregate_fit(self, server_round, results, failures):
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.mean = parameters_to_ndarrays(parameters)[0]
        return parameters, metrics


def run_round(grid: InProcessGrid, *, threshold: float = 0.6, via=None) -> np.ndarray | None:
    """One fit round of Flower's SecAggPlusWorkflow over ``grid`` (through ``via``, a grid
    wrapping it, if given); the mean, or None when the protocol halted."""
    nodes = list(grid.contexts)
    strategy = RecordingFedAvg(len(nodes))
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(
        context=server,
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    for node in nodes:
        legacy.client_manager.register(GridClientProxy(node, via or grid, 1))
    initial = ndarrays_to_parameters([np.zeros(12, np.float32)])
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        initial, keep_input=True
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1, WorkflowKey.START_TIME: time.time()}
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=threshold, max_weight=20.0
    )
    workflow(via or grid, legacy)
    return strategy.mean


def weighted_mean(nodes: list[int]) -> np.ndarray:
    total = sum(weight_of(node) * update_of(node).astype(np.float64) for node in nodes)
    return total / sum(weight_of(node) for node in nodes)


def assert_refused(replies: list[Message], reason: str) -> None:
    assert replies
    for reply in replies:
        assert reply.has_error() and not reply.has_content()
        assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
        assert reply.error.reason.startswith("secure aggregation refused: ")
        assert reason in reply.error.reason


def sent_bytes(replies: list[Message]) -> list[bytes]:
    """Every bytes value in the replies' config records."""
    found: list[bytes] = []
    for reply in replies:
        if not reply.has_content():
            continue
        for record in reply.content.config_records.values():
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                found += [item for item in items if isinstance(item, bytes)]
    return found


NODES = [1001, 1002, 1003, 1004]


def test_a_well_formed_round_through_the_guard_gives_the_weighted_mean():
    grid = InProcessGrid(NODES[:3])

    mean = run_round(grid)

    assert mean is not None
    assert np.abs(mean - weighted_mean(NODES[:3])).max() < 1e-4
    assert not any(reply.has_error() for _, _, reply in grid.replies)
    assert sorted(grid.trained) == NODES[:3]


def test_a_node_that_leaves_after_sharing_its_keys_is_unmasked_through_the_guard():
    grid = InProcessGrid(NODES, leave=((Stage.COLLECT_MASKED_VECTORS, 1004),))

    mean = run_round(grid, threshold=0.75)  # 3 of 4

    assert mean is not None
    assert np.abs(mean - weighted_mean(NODES[:3])).max() < 1e-4
    assert all(not reply.has_error() for reply in grid.stage_replies(Stage.UNMASK))
    unmasked = grid.stage_replies(Stage.UNMASK)[0].content.config_records[RECORD_KEY_CONFIGS]
    assert 1004 in unmasked[Key.NODE_ID_LIST]  # its key, rebuilt to take its pairwise masks off


def test_a_two_node_round_is_refused_unless_the_operator_allows_two():
    refused = InProcessGrid(NODES[:2])
    allowed = InProcessGrid(NODES[:2], mod=make_guarded_secaggplus_mod(min_peers=2))

    assert run_round(refused) is None
    assert run_round(allowed) is not None

    assert_refused(
        refused.stage_replies(Stage.SETUP), "2 nodes in the round, fewer than min_peers=3"
    )
    assert refused.trained == []


def setting(**values: int) -> Tamper:
    def tamper(stage: str, node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
        if stage == Stage.SETUP:
            for key, value in values.items():
                configs[getattr(Key, key)] = value

    return tamper


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (setting(THRESHOLD=2), "threshold 2 is not more than half of 4 shares"),
        (setting(THRESHOLD=5), "threshold 5 exceeds the share number 4"),
        (setting(SHARE_NUMBER=5), "share number 5 exceeds the 4 nodes in the round"),
        (setting(SHARE_NUMBER=2, THRESHOLD=2), "share number 2 is below min_peers=3"),
        (
            setting(SAMPLE_NUMBER=2, SHARE_NUMBER=2, THRESHOLD=2),
            "2 nodes in the round, fewer than min_peers=3",
        ),
    ],
)
def test_setup_numbers_a_coordinator_could_abuse_are_refused(tamper, reason):
    grid = InProcessGrid(NODES, tamper=tamper)

    assert run_round(grid, threshold=0.75) is None

    assert_refused(grid.stage_replies(Stage.SETUP), reason)
    assert grid.trained == []


@pytest.mark.parametrize("fraction", [0.5, 0.6])  # 0.6: fedtune's default; round(2.4) == 2
def test_a_low_threshold_from_flowers_own_workflow_is_refused(fraction):
    grid = InProcessGrid(NODES)

    assert run_round(grid, threshold=fraction) is None  # 2 of 4 shares

    assert_refused(grid.stage_replies(Stage.SETUP), "threshold 2 is not more than half of 4")


def at(wanted: str, change: Callable[[int, ConfigRecord, InProcessGrid], None]) -> Tamper:
    def tamper(stage: str, node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
        if stage == wanted:
            change(node, configs, grid)

    return tamper


def without_self(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    del configs[str(node)]


def with_a_stranger(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    keys = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]
    configs["999"] = keys


def with_one_peer(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    keep = {Key.STAGE, str(node), str(next(other for other in NODES if other != node))}
    for name in [name for name in configs if name not in keep]:
        del configs[name]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (without_self, "is missing from the key list"),
        (with_a_stranger, "keys of 5 nodes, more than the share number 4"),
        (with_one_peer, "keys of 2 nodes (this one included), fewer than min_peers=3"),
    ],
)
def test_key_lists_a_coordinator_could_abuse_are_refused(change, reason):
    grid = InProcessGrid(NODES, tamper=at(Stage.SHARE_KEYS, change))

    assert run_round(grid, threshold=0.75) is None

    replies = grid.stage_replies(Stage.SHARE_KEYS)
    assert_refused(replies, reason)
    assert sent_bytes(replies) == []  # no encrypted key shares left
    assert grid.trained == []


def no_sources(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.SOURCE_LIST] = []
    configs[Key.CIPHERTEXT_LIST] = []


def a_source_twice(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.SOURCE_LIST] = [*configs[Key.SOURCE_LIST], configs[Key.SOURCE_LIST][0]]
    configs[Key.CIPHERTEXT_LIST] = [
        *configs[Key.CIPHERTEXT_LIST],
        configs[Key.CIPHERTEXT_LIST][0],
    ]


def itself_as_source(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.SOURCE_LIST] = [*configs[Key.SOURCE_LIST], node]
    configs[Key.CIPHERTEXT_LIST] = [*configs[Key.CIPHERTEXT_LIST], b"\x00" * 64]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (no_sources, "1 nodes (this one included) to mask with, fewer than min_peers=3"),
        (a_source_twice, "listed twice as a source of key shares"),
        (itself_as_source, "were forwarded back to it"),
    ],
)
def test_forwarded_key_shares_a_coordinator_could_abuse_are_refused_before_training(change, reason):
    grid = InProcessGrid(NODES, tamper=at(Stage.COLLECT_MASKED_VECTORS, change))

    assert run_round(grid, threshold=0.75) is None

    replies = grid.stage_replies(Stage.COLLECT_MASKED_VECTORS)
    assert_refused(replies, reason)
    assert sent_bytes(replies) == []  # no masked update left
    assert grid.trained == []


TARGET = 1002


def target_also_dropped(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    """The attack: TARGET sent its masked update and is listed as surviving; listed as dropped
    as well, every neighbour would hand over both its self-mask seed and its key."""
    configs[Key.DEAD_NODE_ID_LIST] = [*configs[Key.DEAD_NODE_ID_LIST], TARGET]


def held_secret_shares(grid: InProcessGrid, owner: int) -> list[bytes]:
    shares = []
    for node in grid.contexts:
        state = grid.state(node)
        shares += [state.rd_seed_share_dict[owner], state.sk1_share_dict[owner]]
    return shares


def test_a_node_listed_as_surviving_and_dropped_is_refused_and_its_shares_stay():
    shares: list[bytes] = []

    def tamper(stage: str, node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
        if stage == Stage.UNMASK:
            if not shares:  # before the first unmask message reaches a node
                shares.extend(held_secret_shares(grid, TARGET))
            target_also_dropped(node, configs, grid)

    grid = InProcessGrid(NODES, tamper=tamper)

    assert run_round(grid, threshold=0.75) is None

    replies = grid.stage_replies(Stage.UNMASK)
    assert_refused(replies, f"node {TARGET} listed both as surviving and as dropped")
    assert len(shares) == 2 * len(NODES)  # each node holds one share of each secret
    assert not set(shares) & set(sent_bytes(replies))


def test_without_the_guard_that_message_gives_both_secrets_of_the_node_away():
    grid = InProcessGrid(NODES, mod=secaggplus_mod, tamper=at(Stage.UNMASK, target_also_dropped))

    # Flower's own workflow trips over the two kinds of shares mixed in one list; a malicious
    # coordinator runs its own code and keeps them apart, as below.
    with pytest.raises(ValueError, match="Duplicate share"):
        run_round(grid, threshold=0.75)

    seed_shares, key_shares = [], []
    for reply in grid.stage_replies(Stage.UNMASK):
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        owners, shares = configs[Key.NODE_ID_LIST], configs[Key.SHARE_LIST]
        first, last = owners.index(TARGET), len(owners) - 1 - owners[::-1].index(TARGET)
        seed_shares.append(shares[first])
        key_shares.append(shares[last])
    target = grid.state(TARGET)
    assert combine_shares(seed_shares) == target.rd_seed
    assert combine_shares(key_shares) == target.sk1


def move_self_to_dropped(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.ACTIVE_NODE_ID_LIST] = [n for n in configs[Key.ACTIVE_NODE_ID_LIST] if n != node]
    configs[Key.DEAD_NODE_ID_LIST] = [*configs[Key.DEAD_NODE_ID_LIST], node]


def without_self_surviving(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.ACTIVE_NODE_ID_LIST] = [n for n in configs[Key.ACTIVE_NODE_ID_LIST] if n != node]


def a_stranger_dropped(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.DEAD_NODE_ID_LIST] = [*configs[Key.DEAD_NODE_ID_LIST], 999]


def a_survivor_twice(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.ACTIVE_NODE_ID_LIST] = [*configs[Key.ACTIVE_NODE_ID_LIST], node]


def too_few_survivors(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
    configs[Key.ACTIVE_NODE_ID_LIST] = [node, next(n for n in NODES if n != node)]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (move_self_to_dropped, "listed as dropped, though it sent its masked update"),
        (without_self_surviving, "is missing from the surviving nodes"),
        (a_stranger_dropped, "node 999 listed as dropped is not in this round's key list"),
        (a_survivor_twice, "listed twice as surviving"),
        (too_few_survivors, "2 surviving nodes, fewer than the threshold 3"),
    ],
)
def test_unmask_lists_a_coordinator_could_abuse_are_refused(change, reason):
    shares: list[bytes] = []

    def tamper(stage: str, node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
        if stage == Stage.UNMASK:
            if not shares:  # before the first unmask message reaches a node
                for owner in NODES:
                    shares.extend(held_secret_shares(grid, owner))
            change(node, configs, grid)

    grid = InProcessGrid(NODES, tamper=tamper)

    assert run_round(grid, threshold=0.75) is None

    replies = grid.stage_replies(Stage.UNMASK)
    assert_refused(replies, reason)
    assert not set(shares) & set(sent_bytes(replies))


def test_a_survivor_whose_shares_never_reached_the_node_is_refused():
    def hide_1004_from_1001(node: int, configs: ConfigRecord, grid: InProcessGrid) -> None:
        if node == 1001:
            index = configs[Key.SOURCE_LIST].index(1004)
            for key in (Key.SOURCE_LIST, Key.CIPHERTEXT_LIST):
                configs[key] = [v for i, v in enumerate(configs[key]) if i != index]

    grid = InProcessGrid(NODES, tamper=at(Stage.COLLECT_MASKED_VECTORS, hide_1004_from_1001))

    run_round(grid, threshold=0.75)

    [refused] = [r for _, n, r in grid.replies if n == 1001 and r.has_error()]
    assert_refused([refused], "node 1004 listed as surviving, but its key shares never reached")


def test_a_refused_round_cannot_be_resumed_on_the_node():
    unmask: list[Message] = []

    def keep_honest_copy(stage: str, node: int, configs: ConfigRecord, grid: InProcessGrid):
        if stage == Stage.UNMASK and node == TARGET:
            honest = Message(
                RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(copy.deepcopy(dict(configs)))}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            honest.metadata.__dict__["_message_id"] = "honest-unmask"
            unmask.append(honest)
        if stage == Stage.UNMASK:
            target_also_dropped(node, configs, grid)

    grid = InProcessGrid(NODES, tamper=keep_honest_copy)
    run_round(grid, threshold=0.75)

    reply = grid.deliver(unmask[0])

    assert_refused([reply], "expect setup stage, but receive unmask stage")
    assert dict(grid.contexts[TARGET].state.config_records[RECORD_KEY_STATE]) == {}


def test_the_guard_refuses_while_flowers_stock_generator_is_in_use(monkeypatch):
    for name in secagg_masks.FLOWER_MODULES:
        monkeypatch.setattr(sys.modules[name], "pseudo_rand_gen", secagg_masks.STOCK_GENERATOR)
    grid = InProcessGrid(NODES[:3])

    assert run_round(grid) is None

    assert_refused(grid.stage_replies(Stage.SETUP), "stock SecAgg+ mask generator")


def test_messages_without_secaggplus_configs_go_to_the_app():
    message = Message(RecordDict(), dst_node_id=5, message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    answered = Message(RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)

    reply = guarded_secaggplus_mod(message, context, lambda m, c: answered)

    assert reply is answered


@pytest.mark.parametrize("min_peers", [1, 0, True, 2.5])
def test_min_peers_is_a_whole_number_of_at_least_two(min_peers):
    with pytest.raises(ValueError, match="min_peers"):
        make_guarded_secaggplus_mod(min_peers=min_peers)
