"""The budget guard: a round runs only if it keeps its data set within the epsilon cap.

The cap is a hard limit per data set over the node's whole life (every run, every base
model), unlike the run's target, which only sets how much noise the planned rounds get. The
guard is asked before any training, with the exact round that would run, and replays the
data set's whole history from the node's ledger; a round that fits is never refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.privacy.accounting import (
    AccountantName,
    BudgetExhaustedError,
    HistoryEntry,
    epsilon_of,
)


def check_round(
    history: Sequence[HistoryEntry],
    planned: HistoryEntry,
    *,
    cap: float,
    delta: float,
    accountant: AccountantName,
    subject: str = "the data set's",
) -> float:
    """Epsilon of the data set after ``planned``; raises :class:`BudgetExhaustedError` when
    that would pass ``cap``. ``history`` may hold several data sets' rounds (a budget group
    of data sets holding the same people: ``data.shares_budget_with``); ``subject`` names
    whose epsilon it is in the message."""
    spent = epsilon_of(history, delta=delta, accountant=accountant)
    after = epsilon_of([*history, planned], delta=delta, accountant=accountant)
    if after > cap:
        raise BudgetExhaustedError(
            f"declined by the budget guard: this round would bring {subject} epsilon from "
            f"{spent:.3f} to {after:.3f}, past its cap {cap:g} (delta {delta:g}, "
            f"{accountant.upper()})"
        )
    return after
