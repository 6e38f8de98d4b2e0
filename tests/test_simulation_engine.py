"""fedtune's replacement for the Simulation Engine's message poller
(fedtune/platform/runtime/simulation_engine.py), on Flower's own in-memory link state: it
delivers what Flower's poller delivers, each message once, none expired, in one pass per tick;
and a test that fails when the Flower code it stands in for changes."""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from queue import Empty, Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedtune.platform.runtime import simulation_engine

# sha256 of the Flower 1.41.0 source this module replaces or relies on; a change in Flower
# means reading it again (is the poller still quadratic? does the replacement still do what
# get_message_ins does?) and updating the digests.
FLOWER_SOURCES = {
    "vce_api.add_messages_to_queue": (
        vce_api.add_messages_to_queue
        if not simulation_engine.installed()
        else simulation_engine.STOCK,
        "953f4bd4",
    ),
    "InMemoryLinkState.get_message_ins": (InMemoryLinkState.get_message_ins, "6547c8dc"),
    "InMemoryLinkState._check_stored_messages": (
        InMemoryLinkState._check_stored_messages,
        "2be47567",
    ),
}


def digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:8]


@pytest.mark.parametrize("name", list(FLOWER_SOURCES))
def test_the_flower_code_the_replacement_mirrors_is_unchanged(name):
    function, expected = FLOWER_SOURCES[name]
    assert digest(function) == expected, f"{name} changed in Flower: read it again"


def test_flowers_engine_looks_the_poller_up_by_name_when_it_starts():
    source = inspect.getsource(vce_api.run_api)
    assert "target=add_messages_to_queue," in source  # a module global, read at call time
    assert list(inspect.signature(simulation_engine.STOCK).parameters) == list(
        inspect.signature(simulation_engine.add_messages_to_queue).parameters
    )


def test_install_puts_the_replacement_where_the_engine_finds_it(monkeypatch):
    monkeypatch.setattr(vce_api, "add_messages_to_queue", simulation_engine.STOCK)

    simulation_engine.install()

    assert vce_api.add_messages_to_queue is simulation_engine.add_messages_to_queue


# --- on Flower's in-memory link state, set up as run_simulation does --------------------------


@pytest.fixture
def link(monkeypatch):
    """An in-memory link state with a run, 6 registered nodes, and a grid onto it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=1)
    nodes = vce_api._register_nodes(6, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def push(grid: InMemoryGrid, nodes, *, ttl: float | None = None) -> list[str]:
    messages = [
        Message(RecordDict({"c": ConfigRecord({"i": i})}), node, "train", ttl=ttl)
        for i, node in enumerate(nodes)
    ]
    return list(grid.push_messages(messages))


def test_one_pass_delivers_each_waiting_message_once_and_marks_it_delivered(link):
    state, grid, nodes = link
    ids = push(grid, nodes)

    taken = simulation_engine.take_undelivered(state, frozenset(nodes))

    assert [m.metadata.message_id for m in taken] == ids
    assert [m.metadata.dst_node_id for m in taken] == list(nodes)
    assert all(m.metadata.delivered_at for m in taken)
    assert simulation_engine.take_undelivered(state, frozenset(nodes)) == []
    assert all(state.get_message_ins(node_id=n, limit=None) == [] for n in nodes)  # Flower agrees


def test_messages_for_other_nodes_stay_for_them(link):
    state, grid, nodes = link
    push(grid, nodes)
    mine = frozenset(list(nodes)[:2])

    taken = simulation_engine.take_undelivered(state, mine)

    assert {m.metadata.dst_node_id for m in taken} == mine
    rest = list(nodes)[2]
    assert len(state.get_message_ins(node_id=rest, limit=None)) == 1


def test_an_expired_message_is_deleted_not_delivered(link):
    state, grid, nodes = link
    push(grid, list(nodes)[:1], ttl=0.05)
    time.sleep(0.1)

    assert simulation_engine.take_undelivered(state, frozenset(nodes)) == []
    assert state.message_ins_store == {}


def test_the_poller_thread_queues_what_arrives_and_stops(link):
    state, grid, nodes = link
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    poller = threading.Thread(
        target=simulation_engine.add_messages_to_queue,
        args=(state, queue, {node: i for i, node in enumerate(nodes)}, stop),
    )
    poller.start()
    try:
        ids = push(grid, nodes)
        got = [queue.get(timeout=5).metadata.message_id for _ in ids]
    finally:
        stop.set()
        poller.join(timeout=5)

    assert got == ids and not poller.is_alive()
    with pytest.raises(Empty):
        queue.get_nowait()
