"""Flower's SuperNode, run with the shortest heartbeat the SuperLink accepts.

Flower 1.41 hard-codes the SuperNode's heartbeat interval: ``HEARTBEAT_DEFAULT_INTERVAL``
(30 s) from ``flwr.common.constant``, imported by name into ``flwr.supernode.
fleet_http_connection`` (the interval the node announces) and ``flwr.supercore.heartbeat``
(how often it sends). The SuperLink takes a node for dead after ``HEARTBEAT_PATIENCE`` (2)
announced intervals and only then fails the messages it held, so a killed node cost a round
60-110 s. It accepts intervals down to ``HEARTBEAT_MIN_INTERVAL`` (10 s); this entry point
runs Flower's own ``flower-supernode`` with that interval: a dead node is noticed after about
20 s, plus the ServerApp's 3 s poll. The cost: each node sends a small heartbeat request
through the gateway every ~4 s instead of every ~20 s.

``tests/test_supernode_heartbeat.py`` fails when Flower moves or renames what this sets.
"""

from __future__ import annotations

from flwr.common.constant import (
    HEARTBEAT_BASE_MULTIPLIER,
    HEARTBEAT_CALL_TIMEOUT,
    HEARTBEAT_MIN_INTERVAL,
)

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


def main() -> None:
    """``flower-supernode`` with the short heartbeat (same arguments)."""
    use_short_heartbeat()
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
