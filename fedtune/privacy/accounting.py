"""Privacy accounting for DP-SGD: replayable histories, epsilon, and noise calibration.

A history is the list of ``(noise_multiplier, sample_rate, steps)`` triples that Opacus'
accountants keep; the epsilon of a data set is a pure function of its history, the delta and
the accountant, so any stored history can be replayed by an auditor. Opacus' GDP accountant
underestimates epsilon and is not offered.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import opacus
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as privacy_analysis

from fedtune.common.errors import FedtuneError

AccountantName = Literal["rdp", "prv"]
HistoryEntry = tuple[float, float, int]


def accountant_version() -> str:
    """The library that computed a ledger entry's epsilon, with its version."""
    return f"opacus-{opacus.__version__}"


def make_accountant(name: AccountantName, history: Sequence[HistoryEntry] = ()) -> IAccountant:
    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    return np.asarray(
        privacy_analysis.compute_rdp(
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=1,
            orders=RDPAccountant.DEFAULT_ALPHAS,
        )
    )


def epsilon_of(
    history: Sequence[HistoryEntry], *, delta: float, accountant: AccountantName
) -> float:
    """Epsilon spent by ``history`` at ``delta``; 0 for an empty history.

    For RDP this is exactly what Opacus' ``RDPAccountant`` computes (RDP is linear in the
    steps, and the per-step vector of each (sigma, q) is cached): noise calibration and the
    replay of a long ledger call it many times, and each fresh computation costs ~0.1 s.
    """
    if not history:
        return 0.0
    if accountant != "rdp":
        return float(make_accountant(accountant, history).get_epsilon(delta=delta))
    rdp = sum(_rdp_of_one_step(float(sigma), float(q)) * int(steps) for sigma, q, steps in history)
    epsilon, _ = privacy_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(epsilon)


class BudgetExhaustedError(FedtuneError, RuntimeError):
    """No noise multiplier keeps the planned work within the target epsilon."""


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName,
    history: Sequence[HistoryEntry] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``tolerance`` in epsilon) such that ``history`` followed by
    ``steps`` steps at ``sample_rate`` ends at or below ``target_epsilon``.

    Unlike ``opacus.accountants.utils.get_noise_multiplier``, this counts what was already
    spent, so a plan calibrated afresh each round keeps the same noise and ends on target.
    """
    if steps <= 0:
        raise ValueError("steps must be positive")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    spent = epsilon_of(history, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise BudgetExhaustedError(
            f"this data set has already spent epsilon {spent:.3f} (delta {delta:g}), "
            f"not below the target {target_epsilon:g}"
        )

    def total(sigma: float) -> float:
        return epsilon_of(
            [*history, (sigma, sample_rate, steps)], delta=delta, accountant=accountant
        )

    low, high = 0.0, 1.0
    while total(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise BudgetExhaustedError(
                f"no noise multiplier keeps {steps} more steps within epsilon {target_epsilon:g}"
            )
    while True:
        middle = (low + high) / 2
        if total(middle) > target_epsilon:
            low = middle
        else:
            high = middle
        if target_epsilon - total(high) < tolerance or high - low < 1e-6:
            return high
