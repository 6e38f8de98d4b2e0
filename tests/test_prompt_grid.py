"""The coordinator's PromptGrid: replies are collected as they come, SecAgg+'s key stages give
up on a silent node after their own short deadline, and nodes keep the keys the SuperLink
reports (the enrolled roster reads them). On Flower's own in-memory LinkState and Grid."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedtune.coordinator.prompt_grid import KEY_STAGES, PromptGrid


@pytest.fixture
def link() -> Iterator[tuple[object, InMemoryGrid, list[int]]]:
    """A real (in-memory) SuperLink state with a run and two online nodes."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp")
    grid = InMemoryGrid(factory)
    grid.set_run(state.get_run_info(run_ids=[run_id])[0])
    TaskIdentity.run_id, TaskIdentity.node_id = run_id, SUPERLINK_NODE_ID
    TaskIdentity.task_id = int(grid.run.primary_task_id or 0)
    nodes = []
    for name in ("a", "b"):
        node = state.create_node("none", "none", f"key-{name}".encode(), 30, name=name)
        assert state.activate_node(node, 30)
        nodes.append(int(node))
    yield state, grid, nodes
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def answer(state: object, node: int, *, after_s: float, value: int) -> threading.Thread:
    """Node ``node`` answers its first message ``after_s`` seconds after it arrives."""

    def run() -> None:
        while not (pending := state.get_message_ins(node_id=node, limit=None)):  # type: ignore[attr-defined]
            time.sleep(0.02)
        time.sleep(after_s)
        reply = Message(RecordDict({"answer": ConfigRecord({"value": value})}), reply_to=pending[0])
        reply.metadata.__dict__["_message_id"] = reply.object_id  # as Flower's runtime sets it
        assert state.store_message_res(reply) is not None  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def stage_message(node: int, stage: str | None) -> Message:
    content = RecordDict()
    if stage is not None:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    return Message(content, dst_node_id=node, message_type="train")


def test_every_reply_is_returned_once_all_have_come(link):
    state, grid, nodes = link
    threads = [answer(state, n, after_s=0.1 * i, value=i) for i, n in enumerate(nodes)]

    replies = list(PromptGrid(grid).send_and_receive([stage_message(n, None) for n in nodes]))

    assert sorted(int(r.content.config_records["answer"]["value"]) for r in replies) == [0, 1]
    assert {r.metadata.src_node_id for r in replies} == set(nodes)
    for thread in threads:
        thread.join(timeout=5)


@pytest.mark.parametrize("stage", sorted(KEY_STAGES))
def test_a_key_stage_gives_up_on_a_silent_node_after_its_own_deadline(link, stage):
    state, grid, (talking, silent) = link
    answer(state, talking, after_s=0.0, value=1)
    prompt = PromptGrid(grid, key_stage_timeout_s=0.5)

    started = time.monotonic()
    replies = list(
        prompt.send_and_receive(
            [stage_message(talking, stage), stage_message(silent, stage)], timeout=120
        )
    )

    assert [r.metadata.src_node_id for r in replies] == [talking]
    assert time.monotonic() - started < 60  # the caller's 120 s was not waited for


def test_the_training_stage_keeps_the_caller_s_deadline(link):
    state, grid, (node, _) = link
    thread = answer(state, node, after_s=1.0, value=7)  # longer than the key-stage deadline

    replies = list(
        PromptGrid(grid, key_stage_timeout_s=0.2).send_and_receive(
            [stage_message(node, Stage.COLLECT_MASKED_VECTORS)], timeout=60
        )
    )

    assert [int(r.content.config_records["answer"]["value"]) for r in replies] == [7]
    thread.join(timeout=5)


def test_nodes_keep_the_keys_the_superlink_reports(link):
    _, grid, nodes = link

    listed = {int(n.node_id): bytes(n.public_key) for n in PromptGrid(grid).get_nodes()}

    assert listed == {nodes[0]: b"key-a", nodes[1]: b"key-b"}
