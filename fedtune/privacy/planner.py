"""The privacy planner: for a node's data size and privacy target, the logical batch, the
steps of each round, the noise and the epsilon after each round.

What it chooses, and why:

- **Logical batch** (default): the power of two nearest to ``2 * sqrt(N)``, within
  [16, 1024] and at most half the data. More examples per step shrink the noise relative to
  the signal (the noise of an averaged step is ``sigma * C / B``); the field's advice is
  ``B ~ sqrt(N)`` (dp-transformers) to thousands (Li et al. 2022), and our own measurement
  (``benchmarks/dp_utility.py``, 800 examples, epsilon 8) kept 0.34 of the non-private gain
  at B = 64 against 0.29 at B = 32, the ``sqrt(N)`` choice. With it (and the two settings
  below) the study on a GPU kept 0.51, 0.81 and 0.95 of the non-private gain at 800, 3,200
  and 12,800 examples at epsilon 8, and 0.41, 0.74 and 0.92 at epsilon 3
  (``benchmarks/results/dp_utility_study_gpu.json``).
- **Passes over the data**: 3 epochs over the planned rounds (dp-transformers' setting; Li
  et al. use 3-18); the figures above are with it, other counts are not measured.
- **Learning rate and clip norm**: :data:`DP_LEARNING_RATE` and :data:`DP_MAX_GRAD_NORM`
  (``privacy/training_defaults.py`` says how they were measured).
- **Noise**: the smallest noise multiplier with which the planned rounds end at the target
  (Opacus' RDP or PRV accountant, counting what the data set already spent).

The epsilon of every round is the accountant's; ``tests/test_planner.py`` checks it against
Google's ``dp-accounting``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedtune.common.errors import FedtuneError
from fedtune.privacy.accounting import (
    AccountantName,
    HistoryEntry,
    calibrate_noise_multiplier,
    epsilon_of,
)
from fedtune.privacy.training_defaults import DP_LEARNING_RATE, DP_MAX_GRAD_NORM

DEFAULT_EPOCHS = 3.0
MIN_BATCH, MAX_BATCH = 16, 1024
HIGH_SAMPLE_RATE = 0.25  # above: amplification by sampling buys little
LOW_NOISE = 0.5  # below: each step's noise is small against its clipped signal


class PlanError(FedtuneError, ValueError):
    """A plan asked for with input it cannot have (the message names the option)."""


@dataclass(frozen=True)
class Plan:
    """One node's plan: ``rounds`` rounds of ``steps_per_round`` steps of logical batch
    ``batch_size`` (Poisson ``sample_rate``) with ``noise_multiplier``; ``epsilon_after`` is
    the data set's epsilon after each round."""

    examples: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    delta: float
    target_epsilon: float
    epsilon_after: tuple[float, ...]
    accountant: AccountantName
    warnings: tuple[str, ...]
    learning_rate: float = DP_LEARNING_RATE
    max_grad_norm: float = DP_MAX_GRAD_NORM
    expected_seconds: float | None = None  # with a time budget: at its seconds per example

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds

    @property
    def expected_examples_processed(self) -> int:
        """Examples' gradients computed over the plan (the cost in per-example work)."""
        return round(self.total_steps * self.sample_rate * self.examples)


def default_batch_size(examples: int) -> int:
    """The power of two nearest to ``2 * sqrt(examples)``, in [16, 1024], at most half the
    data (and at least 1)."""
    wanted = 2.0 * math.sqrt(max(examples, 1))
    power = 2 ** round(math.log2(wanted))
    return max(1, min(max(MIN_BATCH, min(power, MAX_BATCH)), examples // 2 or 1))


def make_plan(
    examples: int,
    *,
    epsilon: float,
    delta: float,
    rounds: int = 1,
    epochs: float = DEFAULT_EPOCHS,
    batch_size: int | None = None,
    accountant: AccountantName = "rdp",
    history: Sequence[HistoryEntry] = (),
    time_budget_s: float | None = None,
    seconds_per_example: float | None = None,
) -> Plan:
    """The plan for ``examples`` training examples to end at ``epsilon`` (at ``delta``) after
    ``rounds`` rounds, ``history`` (the data set's earlier private rounds) counted.

    With ``time_budget_s`` (and the measured ``seconds_per_example`` of one example's
    gradient on the node's machine) the passes over the data are cut until the plan fits.

    Raises :class:`PlanError` naming the option for input no plan can have.
    """
    _check(examples, epsilon=epsilon, delta=delta, rounds=rounds, epochs=epochs)
    batch = default_batch_size(examples) if batch_size is None else batch_size
    if batch < 1 or batch > examples:
        raise PlanError(
            f"--batch-size {batch}: a logical batch must be between 1 and the {examples} examples"
        )
    sample_rate = 1.0 / math.ceil(examples / batch)  # as Opacus' Poisson loader derives it
    steps = max(1, math.ceil(epochs * examples / batch / rounds))
    warnings = []
    expected_seconds = None
    if time_budget_s is not None:
        if seconds_per_example is None or not seconds_per_example > 0:
            raise PlanError("--seconds-per-example: a time budget needs a positive figure")
        if not (math.isfinite(time_budget_s) and time_budget_s > 0):
            raise PlanError("--time-budget: must be a positive number of minutes")
        step_seconds = seconds_per_example * sample_rate * examples  # the expected batch
        fitting = math.floor(time_budget_s / step_seconds / rounds)
        if fitting < 1:
            raise PlanError(
                f"--time-budget: one step per round (a batch of about {batch}) takes "
                f"{step_seconds * rounds / 60:.1f} min over {rounds} rounds, more than the budget"
            )
        if fitting < steps:
            warnings.append(
                f"cut from {steps} to {fitting} steps per round to fit the time budget "
                f"({fitting * rounds * batch / examples:.2f} passes over the data instead of "
                f"{epochs:g}); the model gains less"
            )
            steps = fitting
        expected_seconds = steps * rounds * step_seconds
    try:
        sigma = calibrate_noise_multiplier(
            target_epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps * rounds,
            accountant=accountant,
            history=history,
        )
    except FedtuneError as error:  # the target is spent, or cannot be met
        raise PlanError(f"--epsilon {epsilon:g}: {error}") from None
    trajectory = [
        epsilon_of(
            [*history, *[(sigma, sample_rate, steps)] * done], delta=delta, accountant=accountant
        )
        for done in range(1, rounds + 1)
    ]
    if sample_rate > HIGH_SAMPLE_RATE:
        warnings.append(
            f"sample rate {sample_rate:.2f} is high: sampling amplifies privacy little; "
            "more examples (or a smaller batch) help"
        )
    if sigma < LOW_NOISE:
        warnings.append(
            f"noise multiplier {sigma:.2f} is low: the target is loose for this data size"
        )
    return Plan(
        examples=examples,
        batch_size=batch,
        sample_rate=sample_rate,
        steps_per_round=steps,
        rounds=rounds,
        noise_multiplier=sigma,
        delta=delta,
        target_epsilon=epsilon,
        epsilon_after=tuple(trajectory),
        accountant=accountant,
        warnings=tuple(warnings),
        expected_seconds=expected_seconds,
    )


def _check(examples: int, *, epsilon: float, delta: float, rounds: int, epochs: float) -> None:
    if examples < 1:
        raise PlanError(f"--examples {examples}: a plan needs at least one example")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise PlanError(f"--epsilon {epsilon:g}: must be a positive number")
    if not 0 < delta < 1 / examples:
        raise PlanError(
            f"--delta {delta:g}: must be above 0 and below 1/N = {1 / examples:.3g} (a delta "
            "of 1/N or more allows leaking one example outright)"
        )
    if rounds < 1:
        raise PlanError(f"--rounds {rounds}: must be at least 1")
    if not (math.isfinite(epochs) and epochs > 0):
        raise PlanError(f"--epochs {epochs:g}: must be a positive number")


def format_plan(plan: Plan) -> str:
    """The plan as a node operator reads it."""
    lines = [
        f"plan for {plan.examples} examples: epsilon {plan.target_epsilon:g} at delta "
        f"{plan.delta:g} over {plan.rounds} {'round' if plan.rounds == 1 else 'rounds'} "
        f"({plan.accountant.upper()})",
        f"  logical batch      {plan.batch_size} (sample rate {plan.sample_rate:.4f})",
        f"  steps per round    {plan.steps_per_round} ({plan.total_steps} in all, "
        f"{plan.total_steps * plan.sample_rate:.1f} passes over the data)",
        f"  noise multiplier   {plan.noise_multiplier:.3f}",
        f"  learning rate      {plan.learning_rate:g} (AdamW), clip norm {plan.max_grad_norm:g}",
        f"  cost               ~{plan.expected_examples_processed} per-example gradients"
        + (f", ~{plan.expected_seconds / 60:.1f} min" if plan.expected_seconds is not None else ""),
        "  epsilon after each round: " + ", ".join(f"{value:.3f}" for value in plan.epsilon_after),
    ]
    lines += [f"  warning: {warning}" for warning in plan.warnings]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_EPOCHS",
    "DP_LEARNING_RATE",
    "DP_MAX_GRAD_NORM",
    "Plan",
    "PlanError",
    "default_batch_size",
    "format_plan",
    "make_plan",
]
