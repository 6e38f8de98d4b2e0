"""Metrics a node releases under differential privacy: a Gaussian mechanism on bounded values,
accounted in the node's ledger as entries of kind ``metric_release``.

Each example contributes a row of values scaled to [0, 1] (:func:`release_sums`): adding or
removing one example moves the column sums by at most ``sqrt(columns)`` in L2 norm, and each
sum gets Gaussian noise of ``noise_multiplier`` times that. A held-out loss
(:func:`release_mean`) is the row ``(min(max(v, 0), bound) / bound, 1)``: the released mean is
the noisy sum over the noisy count (at least 1), the released count that noisy count rounded;
an A/B test's paired statistics are a row of a few columns per metric. Anything computed
from the release afterwards (a perplexity, an A/B interval) costs nothing more. One release
is one Gaussian mechanism with ``noise_multiplier`` (sample rate 1, one step), composed by
the accountant with every other private entry of the same data set, so the epsilon a node's
ledger shows for a data set covers its training and what it said about it since.

The noise comes from the operating system's random source (``secrets``), not a seeded
generator; floating-point Gaussian sampling has known, small leaks (Mironov 2012) that this
does not address.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.privacy.accounting import AccountantName, accountant_version, epsilon_of
from fedtune.privacy.budget_guard import check_round
from fedtune.privacy.ledger import Checkpoint, LedgerEntry
from fedtune.privacy.node_ledger import NodeLedger

KIND = "metric_release"
METHOD = "gaussian"

Noise = Callable[[float], float]  # standard deviation -> one draw


def _system_noise(std: float) -> float:
    return secrets.SystemRandom().gauss(0.0, std)


@dataclass(frozen=True)
class ReleasedSums:
    """The noisy column sums of a release; ``noise_std`` is the noise's standard deviation on
    each (in the contributions' units); ``entry`` and ``checkpoint`` record it."""

    sums: tuple[float, ...]
    count: int  # examples that contributed (the node's own figure: not released as such)
    noise_std: float
    entry: LedgerEntry
    checkpoint: Checkpoint


@dataclass(frozen=True)
class ReleasedMean:
    """What leaves the node: the noisy mean and count; ``entry`` is its ledger record and
    ``checkpoint`` the ledger's signed head after it (both go to the coordinator)."""

    mean: float
    count: int
    noise_std: float  # of the noisy sum
    entry: LedgerEntry
    checkpoint: Checkpoint


def release_sums(
    contributions: Sequence[Sequence[float]],
    *,
    columns: int,
    noise_multiplier: float,
    ledger: NodeLedger,
    data_fingerprint: str,
    base_model_fingerprint: str,
    run_id: str,
    round_number: int,
    cap: float,
    delta: float,
    accountant: AccountantName,
    noise: Noise = _system_noise,
) -> ReleasedSums:
    """The column sums of ``contributions`` (one row of ``columns`` values in [0, 1] per
    example; values outside are clipped, non-finite ones count as 1) under the Gaussian
    mechanism, recorded in ``ledger`` before they are returned.

    One example's row has L2 norm at most ``sqrt(columns)``: each sum gets noise of standard
    deviation ``noise_multiplier * sqrt(columns)``. The entry's ``max_grad_norm`` records that
    bound. Raises :class:`~fedtune.privacy.accounting.BudgetExhaustedError` when the release
    would take the data set past ``cap``: nothing is recorded or released then.
    """
    if not noise_multiplier > 0 or columns < 1:
        raise ValueError("noise_multiplier must be positive and columns at least 1")
    history = ledger.dp_history(data_fingerprint)
    planned = (float(noise_multiplier), 1.0, 1)
    epsilon_after = check_round(history, planned, cap=cap, delta=delta, accountant=accountant)
    sensitivity = math.sqrt(columns)
    totals = [0.0] * columns
    for row in contributions:
        if len(row) != columns:
            raise ValueError(f"every contribution has {columns} values, got {len(row)}")
        for index, value in enumerate(row):
            totals[index] += min(max(float(value), 0.0), 1.0) if math.isfinite(value) else 1.0
    std = noise_multiplier * sensitivity
    entry, checkpoint = ledger.append(
        {
            "run_id": run_id,
            "round": round_number,
            "base_model_fingerprint": base_model_fingerprint,
            "data_fingerprint": data_fingerprint,
            "mode": "dp",
            "steps": 1,
            "sample_rate": 1.0,
            "noise_multiplier": float(noise_multiplier),
            "max_grad_norm": sensitivity,
            "delta": delta,
            "epsilon_round": epsilon_of([planned], delta=delta, accountant=accountant),
            "epsilon_after": epsilon_after,
            "epsilon_cap": cap,
            "accountant": accountant,
            "accountant_version": accountant_version(),
            "kind": KIND,
            "method": METHOD,
            "privacy_unit": "example",
        }
    )
    return ReleasedSums(
        sums=tuple(total + noise(std) for total in totals),
        count=len(contributions),
        noise_std=std,
        entry=entry,
        checkpoint=checkpoint,
    )


def noise_std(*, bound: float, noise_multiplier: float) -> float:
    """Standard deviation of the noise on a mean's sum: the multiplier times the L2
    sensitivity (``bound * sqrt(2)``: the clipped value and the count)."""
    return noise_multiplier * bound * math.sqrt(2.0)


def release_mean(
    values: Sequence[float],
    *,
    bound: float,
    noise_multiplier: float,
    noise: Noise = _system_noise,
    **record: Any,
) -> ReleasedMean:
    """The mean of ``values`` (one per example, clipped to [0, ``bound``]) under the Gaussian
    mechanism: :func:`release_sums` of each example's ``(value / bound, 1)``. ``record`` are
    :func:`release_sums`'s ledger options (``ledger``, ``data_fingerprint``, ``cap``, ...)."""
    if not bound > 0:
        raise ValueError("bound must be positive")
    rows = [(v / bound if math.isfinite(v) else 1.0, 1.0) for v in map(float, values)]
    released = release_sums(
        rows, columns=2, noise_multiplier=noise_multiplier, noise=noise, **record
    )
    scaled_sum, count = released.sums
    return ReleasedMean(
        mean=scaled_sum * bound / max(count, 1.0),
        count=max(1, round(count)),
        noise_std=released.noise_std * bound,
        entry=released.entry,
        checkpoint=released.checkpoint,
    )
