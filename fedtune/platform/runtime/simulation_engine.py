"""Flower 1.41's Simulation Engine without its quadratic polling.

The engine hands messages to its ClientApp workers from one thread,
``vce_api.add_messages_to_queue``: every 0.1 s it calls ``state.get_message_ins(node, limit=1)``
once per simulated node, and each call walks every stored message (checking each one's expiry
and federation). With N nodes and about N messages in flight that is N**2 checks ten times a
second, for the whole round: measured 910 / 19,200 / 99,300 calls for 10 / 100 / 300 nodes,
40 s of CPU in two rounds at 300, taken from the nodes it starves. Flower has no setting for
it (the 0.1 s and the per-node loop are literals).

:func:`add_messages_to_queue` has the stock function's signature and does the same work in one
pass per tick: it walks the stored messages once, takes those not yet delivered to one of the
engine's nodes, checks them as ``get_message_ins`` does (``_check_stored_messages``: expired or
out-of-federation messages are deleted, not delivered), marks them delivered and queues them,
all under the state's lock. Per tick that is linear in the messages stored. It needs Flower's
in-memory link state (the only one ``run_simulation`` uses); with any other state it runs the
stock function. :func:`install` puts it in place of the stock one, which ``vce_api.run_api``
looks up by name when it starts the engine's thread.

``tests/test_simulation_engine.py`` fails when Flower's code underneath changes (the stock
function, ``get_message_ins``, ``_check_stored_messages``, or how ``run_api`` finds the
function). Upstream issue text, to file: "vce_api.add_messages_to_queue polls
get_message_ins per node every 0.1 s and each call scans all stored messages: O(nodes x
messages) per tick; one pass per tick over undelivered messages grouped by destination makes
it linear".
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState
from flwr.supercore.date import now

POLL_S = 0.1  # Flower's tick
STOCK = vce_api.add_messages_to_queue


def add_messages_to_queue(
    state: LinkState,
    queue: Queue[Message],
    nodes_mapping: Mapping[int, int],
    f_stop: threading.Event,
) -> None:
    """Put the messages for ``nodes_mapping``'s nodes into ``queue`` until ``f_stop`` is set
    (Flower's signature); one pass over the stored messages per tick."""
    if not isinstance(state, InMemoryLinkState):
        STOCK(state, queue, nodes_mapping, f_stop)  # type: ignore[arg-type]
        return
    nodes = frozenset(nodes_mapping)
    while not f_stop.is_set():
        for message in take_undelivered(state, nodes):
            queue.put(message)
        f_stop.wait(POLL_S)


def take_undelivered(state: InMemoryLinkState, nodes: frozenset[int]) -> list[Message]:
    """The stored messages not yet delivered whose destination is in ``nodes``, checked and
    marked delivered as ``get_message_ins`` does, in the order they were stored."""
    with state.lock:
        waiting = [
            message_id
            for message_id, message in state.message_ins_store.items()
            if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
        ]
        if not waiting:
            return []
        state._check_stored_messages(set(waiting))  # deletes the expired and the stray
        taken = [
            message
            for message_id in waiting
            if (message := state.message_ins_store.get(message_id)) is not None
        ]
        delivered_at = now().isoformat()
        for message in taken:
            message.metadata.delivered_at = delivered_at
    return taken


def install() -> None:
    """Make Flower's Simulation Engine use :func:`add_messages_to_queue` (idempotent)."""
    vce_api.add_messages_to_queue = add_messages_to_queue


def installed() -> bool:
    return vce_api.add_messages_to_queue is add_messages_to_queue
