"""Metrics a node releases under differential privacy: a Gaussian mechanism on bounded values,
accounted in the node's ledger as entries of kind ``metric_release``.

A held-out loss is a mean over the node's examples: each example contributes the vector
``(min(max(v, 0), bound), bound)`` — its clipped value, and ``bound`` for counting it — and the
two sums get Gaussian noise of standard deviation ``noise_multiplier * bound * sqrt(2)``, the L2
sensitivity of adding or removing one example. The released mean is the noisy sum over the
noisy count (at least 1); the released count is that noisy count, rounded. Anything computed
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
class ReleasedMean:
    """What leaves the node: the noisy mean and count; ``entry`` is its ledger record and
    ``checkpoint`` the ledger's signed head after it (both go to the coordinator)."""

    mean: float
    count: int
    noise_std: float  # of each noisy sum
    entry: LedgerEntry
    checkpoint: Checkpoint


def noise_std(*, bound: float, noise_multiplier: float) -> float:
    """Standard deviation of the noise on each sum: the multiplier times the L2 sensitivity."""
    return noise_multiplier * bound * math.sqrt(2.0)


def release_mean(
    values: Sequence[float],
    *,
    bound: float,
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
) -> ReleasedMean:
    """The mean of ``values`` (one per example of the data set ``data_fingerprint``), released
    under the Gaussian mechanism and recorded in ``ledger`` before it is returned.

    Raises :class:`~fedtune.privacy.accounting.BudgetExhaustedError` when the release would
    take the data set past ``cap``: nothing is recorded or released then.
    """
    if not bound > 0 or not noise_multiplier > 0:
        raise ValueError("bound and noise_multiplier must be positive")
    history = ledger.dp_history(data_fingerprint)
    planned = (float(noise_multiplier), 1.0, 1)
    epsilon_after = check_round(history, planned, cap=cap, delta=delta, accountant=accountant)
    std = noise_std(bound=bound, noise_multiplier=noise_multiplier)
    total = sum(min(max(v, 0.0), bound) if math.isfinite(v) else bound for v in map(float, values))
    total += noise(std)
    count = len(values) + noise(std) / bound
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
            "max_grad_norm": float(bound),
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
    released_count = max(1, round(count))
    return ReleasedMean(
        mean=total / max(count, 1.0),
        count=released_count,
        noise_std=std,
        entry=entry,
        checkpoint=checkpoint,
    )
