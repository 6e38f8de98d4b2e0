"""Model health, per round: the signals an admin watches and the alerts they raise.

Signals come from what the coordinator holds: each node's update against the global adapter
it was sent (norm, its ratio to the other nodes' median, cosine similarity to the aggregate
step), losses, participation, and privacy spent against each node's cap. Alerts are simple,
explained rules: the global held-out loss rising for ``LOSS_RISING_ROUNDS`` rounds in a row,
an update whose norm is ``OUTLIER_RATIO`` times the others' median, an update with non-finite
values, a node past ``NEAR_CAP_SHARE`` of its epsilon cap, a global loss ``DIVERGENCE_SHARE``
above its best, a global preference accuracy (DPO's implicit reward on held-out preference
pairs) falling ``LOSS_RISING_ROUNDS`` rounds in a row, and nodes that declined or failed.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LOSS_RISING_ROUNDS = 2
OUTLIER_RATIO = 5.0
NEAR_CAP_SHARE = 0.9
PLAN_TOLERANCE = 0.01  # spending this much above the plan's epsilon is still on plan
DIVERGENCE_SHARE = 0.25

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Signal:
    signal: str
    node_name: str | None  # None: the global model
    value: float | None
    unavailable: str | None = None


@dataclass(frozen=True)
class Alert:
    kind: str
    node_name: str | None
    message: str


def _step(update: Arrays, reference: Arrays) -> np.ndarray:
    return np.concatenate(
        [
            (np.asarray(update[k], np.float64) - np.asarray(reference[k], np.float64)).ravel()
            for k in sorted(reference)
        ]
    )


def update_signals(
    global_arrays: Arrays, updates: Mapping[str, Arrays], aggregate: Arrays | None
) -> tuple[list[Signal], list[Alert]]:
    """Norm of each node's step (its update minus the global adapter it started from), the
    ratio of that norm to the median of the other nodes' norms, and the cosine similarity of
    the step to the aggregate step."""
    steps = {name: _step(arrays, global_arrays) for name, arrays in updates.items()}
    norms = {name: float(np.linalg.norm(step)) for name, step in steps.items()}
    overall = _step(aggregate, global_arrays) if aggregate is not None else None
    signals: list[Signal] = []
    alerts: list[Alert] = []
    for name, step in steps.items():
        signals.append(Signal("update-norm", name, norms[name]))
        others = [norm for other, norm in norms.items() if other != name]
        if others and statistics.median(others) > 0:
            ratio = norms[name] / statistics.median(others)
            signals.append(Signal("update-norm-ratio", name, ratio))
            if ratio >= OUTLIER_RATIO:
                alerts.append(
                    Alert(
                        "outlier-update",
                        name,
                        f"{name}'s update norm {norms[name]:.3g} is {ratio:.1f}x the median of "
                        f"the other nodes' ({statistics.median(others):.3g})",
                    )
                )
        else:
            signals.append(
                Signal("update-norm-ratio", name, None, "needs at least one other update")
            )
        if overall is not None and norms[name] > 0 and float(np.linalg.norm(overall)) > 0:
            cosine = float(step @ overall / (norms[name] * np.linalg.norm(overall)))
            signals.append(Signal("cosine-to-aggregate", name, cosine))
        else:
            signals.append(Signal("cosine-to-aggregate", name, None, "no aggregate step"))
    return signals, alerts


def rejection_alerts(rejections: Sequence[tuple[str | None, str, str]]) -> list[Alert]:
    """``(node, kind, reason)`` of the replies left out: each becomes an alert."""
    alerts = []
    for node, kind, reason in rejections:
        if "non-finite" in reason:
            alerts.append(Alert("non-finite", node, f"{node}'s update: {reason}"))
        elif kind in ("declined", "failed"):
            alerts.append(Alert(kind, node, f"{node} {kind}: {reason}"))
        else:
            alerts.append(Alert("rejected", node, f"{node}'s update was rejected: {reason}"))
    return alerts


def budget_alerts(
    spent: Mapping[str, tuple[float | None, float | None, float | None]],
) -> list[Alert]:
    """``{node: (epsilon, cap, planned)}``: a node ahead of its plan (``planned``: the epsilon
    its plan expected by this round), and a node past ``NEAR_CAP_SHARE`` of its cap unless it
    is on plan. A plan that ends at the cap passes 90% of it on the way (epsilon grows fast in
    the first rounds): that is the plan, not an alarm."""
    alerts = []
    for node, (epsilon, cap, planned) in spent.items():
        ahead = (
            epsilon is not None
            and planned is not None
            and epsilon > planned * (1 + PLAN_TOLERANCE) + 1e-9
        )
        if ahead:
            assert epsilon is not None and planned is not None
            alerts.append(
                Alert(
                    "ahead-of-plan",
                    node,
                    f"{node} has spent epsilon {epsilon:.2f}, its plan expected {planned:.2f} "
                    "by this round: at this pace it reaches its cap before its planned rounds end",
                )
            )
        on_plan = planned is not None and not ahead
        if epsilon is not None and cap and epsilon >= NEAR_CAP_SHARE * cap and not on_plan:
            alerts.append(
                Alert(
                    "near-cap",
                    node,
                    f"{node} has spent epsilon {epsilon:.2f} of its cap {cap:g} "
                    f"({epsilon / cap:.0%})",
                )
            )
    return alerts


def loss_alerts(held_out: Sequence[float | None]) -> list[Alert]:
    """The global held-out loss of every round so far, oldest first."""
    if not held_out or held_out[-1] is None:
        return []
    latest = held_out[-1]
    if not math.isfinite(latest):
        return [Alert("divergence", None, f"the global held-out loss is {latest}")]
    alerts = []
    recent = held_out[-(LOSS_RISING_ROUNDS + 1) :]
    if (
        len(recent) == LOSS_RISING_ROUNDS + 1
        and all(v is not None for v in recent)
        and all(b > a for a, b in itertools.pairwise(recent))  # type: ignore[operator]
    ):
        alerts.append(
            Alert(
                "loss-rising",
                None,
                f"the global held-out loss rose {LOSS_RISING_ROUNDS} rounds in a row: "
                + " -> ".join(f"{v:.3f}" for v in recent if v is not None),
            )
        )
    best = min(v for v in held_out if v is not None and math.isfinite(v))
    if latest > best * (1 + DIVERGENCE_SHARE):
        alerts.append(
            Alert(
                "divergence",
                None,
                f"the global held-out loss {latest:.3f} is {latest / best - 1:.0%} above its "
                f"best {best:.3f}",
            )
        )
    return alerts


PREFERENCE_SIGNALS = ("preference-accuracy", "reward-margin")


def preference_signals(
    replies: Mapping[str, Mapping[str, Any]],
) -> tuple[list[Signal], float | None]:
    """Preference accuracy and reward margin per node (``{node: evaluate metrics}``; nodes
    whose held-out data holds no preference pairs send none) and over all their pairs
    together (each node weighted by its pairs); the global accuracy is returned too."""
    signals: list[Signal] = []
    totals = dict.fromkeys(PREFERENCE_SIGNALS, 0.0)
    pairs_in_all = 0
    for name, metrics in replies.items():
        pairs = metrics.get("held-out-pairs")
        values = {signal: metrics.get(signal) for signal in PREFERENCE_SIGNALS}
        if not _whole(pairs) or not all(_number(v) for v in values.values()):
            continue
        pairs_in_all += int(pairs)  # type: ignore[arg-type]
        for signal, value in values.items():
            signals.append(Signal(signal, name, float(value)))  # type: ignore[arg-type]
            totals[signal] += float(value) * int(pairs)  # type: ignore[arg-type]
    if not pairs_in_all:
        return signals, None
    signals += [Signal(s, None, totals[s] / pairs_in_all) for s in PREFERENCE_SIGNALS]
    return signals, totals["preference-accuracy"] / pairs_in_all


def preference_alerts(accuracy: Sequence[float | None]) -> list[Alert]:
    """The global preference accuracy of every round so far, oldest first: an alert when it
    fell ``LOSS_RISING_ROUNDS`` rounds in a row (the model moves away from the preferences)."""
    recent = accuracy[-(LOSS_RISING_ROUNDS + 1) :]
    if len(recent) < LOSS_RISING_ROUNDS + 1 or any(v is None for v in recent):
        return []
    if not all(b < a for a, b in itertools.pairwise(recent)):  # type: ignore[operator]
        return []
    return [
        Alert(
            "preference-falling",
            None,
            f"the global held-out preference accuracy fell {LOSS_RISING_ROUNDS} rounds in a "
            "row: " + " -> ".join(f"{v:.3f}" for v in recent if v is not None),
        )
    ]


def _number(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(float(value))
    )


def _whole(value: Any) -> bool:
    return _number(value) and float(value) >= 1 and float(value).is_integer()
