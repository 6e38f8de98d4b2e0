"""A node's cost figures, read from its reply with the suspicion any node's word deserves.

A reply's metrics are the node's own statements: a faulty or hostile node may send a negative
count, NaN, 1e308 seconds, a list or a string where a number belongs. Each figure is checked on
its own; one that fails is stored as None and named in ``refused`` with the reason (it is never
clipped into a plausible value), so the other figures, the round and the database stay sound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.platform.db.storage import NodeCost
from fedtune.platform.wire.messages import (
    EVALUATE_DEVICE_SECONDS,
    EVALUATE_TOKENS,
    NODE_SECONDS,
    TRAIN_DEVICE_SECONDS,
    TRAIN_TOKENS,
)

# Bounds past which a figure is refused as absurd: a week of one message's work, and more
# tokens than a round on any fleet reads (1e6 tokens/s for that week) -- and far below
# BIGINT's 9.2e18 and a float's range, so a stored figure always sums safely.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_TOKENS = 10**12

TOKEN_FIELDS = {"train_tokens": TRAIN_TOKENS, "evaluate_tokens": EVALUATE_TOKENS}
SECONDS_FIELDS = {
    "train_device_seconds": TRAIN_DEVICE_SECONDS,
    "evaluate_device_seconds": EVALUATE_DEVICE_SECONDS,
    "wall_seconds": NODE_SECONDS,
}


@dataclass(frozen=True)
class CostFigures:
    """The figures of one reply that passed (None: not sent, or refused), and the refusals."""

    train_tokens: int | None = None
    evaluate_tokens: int | None = None
    train_device_seconds: float | None = None
    evaluate_device_seconds: float | None = None
    wall_seconds: float | None = None
    refused: tuple[str, ...] = ()


def read_costs(metrics: Mapping[str, Any]) -> CostFigures:
    """The cost figures of a reply's ``metrics`` record."""
    values: dict[str, Any] = {}
    refused: list[str] = []
    for column, name in TOKEN_FIELDS.items():
        if name in metrics:
            values[column], problem = _tokens(metrics[name])
            if problem:
                refused.append(f"{name} {_shown(metrics[name])}: {problem}")
    for column, name in SECONDS_FIELDS.items():
        if name in metrics:
            values[column], problem = _seconds(metrics[name])
            if problem:
                refused.append(f"{name} {_shown(metrics[name])}: {problem}")
    return CostFigures(**values, refused=tuple(refused))


def cost_row(
    figures: CostFigures,
    *,
    run_id: str,
    server_round: int,
    phase: str,
    node_name: str,
    flower_node_id: str,
) -> NodeCost:
    return NodeCost(
        run_id=run_id,
        round=server_round,
        phase=phase,
        node_name=node_name,
        flower_node_id=flower_node_id,
        train_tokens=figures.train_tokens,
        evaluate_tokens=figures.evaluate_tokens,
        train_device_seconds=figures.train_device_seconds,
        evaluate_device_seconds=figures.evaluate_device_seconds,
        wall_seconds=figures.wall_seconds,
        refused="; ".join(figures.refused) or None,
    )


def _tokens(value: Any) -> tuple[int | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, int):
        return None, "not a whole number"
    if value < 0:
        return None, "negative"
    if value > MAX_TOKENS:
        return None, f"more than {MAX_TOKENS:.0e} tokens"
    return value, None


def _seconds(value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, "not a number"
    if not math.isfinite(value):
        return None, "not finite"
    if value < 0:
        return None, "negative"
    if value > MAX_SECONDS:
        return None, f"more than {MAX_SECONDS:.0f} s"
    return float(value), None


def _shown(value: Any) -> str:
    """The refused value for the record, short (a node may send a long list)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
