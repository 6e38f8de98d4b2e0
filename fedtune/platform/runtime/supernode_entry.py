"""Flower's SuperNode, run with the shortest heartbeat the SuperLink accepts and shorter waits.

Flower 1.41 hard-codes the SuperNode's heartbeat interval: ``HEARTBEAT_DEFAULT_INTERVAL``
(30 s) from ``flwr.common.constant``, imported by name into ``flwr.supernode.
fleet_http_connection`` (the interval the node announces) and ``flwr.supercore.heartbeat``
(how often it sends). The SuperLink takes a node for dead after ``HEARTBEAT_PATIENCE`` (2)
announced intervals and only then fails the messages it held, so a killed node cost a round
60-110 s. It accepts intervals down to ``HEARTBEAT_MIN_INTERVAL`` (10 s); this entry point
runs Flower's own ``flower-supernode`` with that interval: a dead node is noticed after about
20 s, plus the ServerApp's 3 s poll. The cost: each node sends a small heartbeat request
through the gateway every ~4 s instead of every ~20 s.

Flower 1.41 also hard-codes the SuperNode's waits in ``flwr.supernode.start_client_internal``:
``time.sleep(3)`` between requests for work when none came, and ``time.sleep(0.5)`` while it
waits for the ClientApp's reply (and for each of its objects). Every exchange of a round paid
them: about 1.5 s on average per message from the idle poll alone and 0.5 s per reply, four
times in a SecAgg+ round. :func:`use_short_waits` gives that module a ``time`` whose ``sleep``
waits :data:`REPLY_WAIT_S` instead of 0.5 s and, instead of 3 s, :data:`BUSY_POLL_S` for
:data:`BUSY_S` after the node last sent a reply (a round's next message, e.g. SecAgg+'s next
stage, follows within seconds) and :data:`IDLE_POLL_S` otherwise (the module uses ``time`` for
nothing else); its ``_push_messages`` is wrapped to note when a reply went out. The cost: a
node asks the SuperLink (through the gateway) for work twice a second when idle and twenty
times a second for 5 s after each reply, instead of every 3 s, a small protobuf POST each; the
reply wait is a look at the node's own memory.

:func:`use_short_waits` also retries the node's object pulls sooner
(:mod:`fedtune.platform.runtime.object_pulls`).

``tests/test_supernode_heartbeat.py`` fails when Flower moves or renames what this sets.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable
from typing import Any

from flwr.common.constant import (
    HEARTBEAT_BASE_MULTIPLIER,
    HEARTBEAT_CALL_TIMEOUT,
    HEARTBEAT_MIN_INTERVAL,
)

from fedtune.platform.runtime.object_pulls import retry_pulls_sooner

HEARTBEAT_INTERVAL_S: float = float(HEARTBEAT_MIN_INTERVAL)
# How often the node then sends one (Flower's HeartbeatSender: (interval - call timeout)
# times 0.8, jittered by +-0.1).
HEARTBEAT_EVERY_S: float = (
    HEARTBEAT_INTERVAL_S - HEARTBEAT_CALL_TIMEOUT
) * HEARTBEAT_BASE_MULTIPLIER


def use_short_heartbeat() -> None:
    """Set the interval in the Flower modules that read it (in this process only)."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    for module in (fleet_http_connection, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL")
        module.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_INTERVAL_S  # type: ignore[attr-defined]


IDLE_POLL_S: float = 0.5  # Flower: 3 s between requests for work when there was none
BUSY_POLL_S: float = 0.05  # the same, within BUSY_S of the node's last reply
BUSY_S: float = 5.0
REPLY_WAIT_S: float = 0.05  # Flower: 0.5 s between looks for the ClientApp's reply
FLOWER_IDLE_S, FLOWER_REPLY_WAIT_S = 3, 0.5
_last_reply = [-BUSY_S]  # time.monotonic() when the node last pushed its replies


def _short_sleep(seconds: float) -> None:
    """``time.sleep`` with Flower's two hard-coded waits replaced (any other unchanged)."""
    if seconds == FLOWER_IDLE_S:
        busy = time.monotonic() - _last_reply[0] < BUSY_S
        seconds = BUSY_POLL_S if busy else IDLE_POLL_S
    elif seconds == FLOWER_REPLY_WAIT_S:
        seconds = REPLY_WAIT_S
    time.sleep(seconds)


def _noting_replies(push: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(push)
    def pushed(*args: Any, **kwargs: Any) -> None:
        try:
            push(*args, **kwargs)
        finally:
            _last_reply[0] = time.monotonic()

    return pushed


def use_short_waits() -> None:
    """Give Flower's SuperNode loop a ``time`` whose ``sleep`` waits less (this process only)."""
    from flwr.supernode import start_client_internal

    found: Any = getattr(start_client_internal, "time", None)
    if found is not time and not isinstance(found, types.SimpleNamespace):
        raise RuntimeError(f"{start_client_internal.__name__} no longer uses the time module")
    push = getattr(start_client_internal, "_push_messages", None)
    if push is None:
        raise RuntimeError(f"{start_client_internal.__name__} no longer has _push_messages")
    if not hasattr(push, "__wrapped__"):
        start_client_internal._push_messages = _noting_replies(push)
    retry_pulls_sooner(start_client_internal)
    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    start_client_internal.time = types.SimpleNamespace(  # type: ignore[assignment]
        **{**names, "sleep": _short_sleep}
    )


def main() -> None:
    """``flower-supernode`` with the short heartbeat and waits (same arguments)."""
    use_short_heartbeat()
    use_short_waits()
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
