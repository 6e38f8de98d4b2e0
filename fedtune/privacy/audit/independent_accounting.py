"""Recompute a ledger's epsilons with an accountant written independently of Opacus.

A node computes every epsilon in its ledger with Opacus (:mod:`fedtune.privacy.accounting`).
An auditor need not trust that code: each entry records the parameters its epsilon comes from,
so this module replays every data set's history ``(noise_multiplier, sample_rate, steps)`` with
Google's ``dp_accounting`` and compares, entry by entry, ``epsilon_after`` (the data set's whole
history up to and including the entry, across runs) and ``epsilon_round`` (the entry's steps
alone).

``"rdp"`` entries
    dp-accounting's RDP of the Poisson-subsampled Gaussian (Mironov, Talwar and Zhang 2019,
    "Rényi Differential Privacy of the Sampled Gaussian Mechanism") at Opacus' RDP orders,
    converted to (epsilon, delta) with the bound Opacus uses too (Balle et al. 2020,
    "Hypothesis Testing Interpretations and Renyi Differential Privacy", Theorem 21). At integer
    orders both libraries evaluate the same finite sum and agree to about 1e-12. At fractional
    orders dp-accounting 0.6 sums the terms of the series in absolute value (and drops an order
    whose sum does not converge), an upper bound on the RDP, whereas Opacus' signed sum is exact
    (checked against numerical integration). So where Opacus' best order is fractional the
    recomputed epsilon lies *above* the stored one: measured, under 0.4% for epsilon up to 8 at
    sampling rates up to 0.25, about 2% near epsilon 16-20 with q >= 0.2, and tens of percent
    for epsilons in the tens or hundreds. A stored epsilon agrees when ``recomputed - stored``
    lies within ``-rdp_tolerance`` (floating-point noise) and ``+rdp_fractional_allowance`` (that
    one-sided bias), relative to the stored value. The allowance is also how far below the truth
    an understated epsilon can go unnoticed: 1% by default, which still catches an epsilon that
    forgets an earlier run (2% in the tests), and flags honest entries only from about epsilon
    16 at sampling rates of 0.2 and more (raise it for such a ledger).

``"prv"`` entries
    dp-accounting's privacy loss distributions (Meiser and Mohammadi 2018; Doroshenko et al.
    2022, "Connect the Dots"), composed as its ``PLDAccountant`` does (pessimistic
    discretisation, interval 1e-4). PLD and Opacus' PRV accountant (Gopi et al. 2021) are both
    numerically tight but not identical: Opacus reports PRV's upper bound, about its
    ``eps_error`` of 0.01 above its estimate, and the two differ by +0.010 to +0.014 in
    epsilon (measured for epsilon 0.05 to 150). The tolerance is absolute: ``pld_tolerance``.

Non-private entries carry no epsilon; they are reported as skipped. Entries are grouped by
(node, data fingerprint) and replayed in ``seq`` order; every dp entry is composed once per
accountant, and per-step RDP vectors and per-round PLDs are cached, so a long ledger costs
linear time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

import numpy as np
from dp_accounting import GaussianDpEvent, NeighboringRelation, PoissonSampledDpEvent
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon as rdp_to_epsilon

# Opacus' RDPAccountant.DEFAULT_ALPHAS (opacus/accountants/rdp.py), written out so that the
# recomputation does not read them from the library it checks; a test keeps the two equal.
OPACUS_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(order) for order in range(12, 64)]
)
# PLDAccountant's default discretisation; the PRV/PLD tolerance below was measured with it.
PLD_DISCRETIZATION = 1e-4

DEFAULT_RDP_TOLERANCE = 1e-6
DEFAULT_RDP_FRACTIONAL_ALLOWANCE = 0.01
DEFAULT_PLD_TOLERANCE = 0.02

ACCOUNTANTS = ("rdp", "prv")
MODES = ("dp", "non-private")


def dp_accounting_version() -> str:
    try:
        return metadata.version("dp-accounting")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Tolerance:
    """How far a recomputed epsilon may lie from the stored one: ``recomputed - stored`` in
    ``[-below, +above]``, in epsilon (``absolute``) or as a fraction of the stored epsilon
    (``relative``)."""

    kind: Literal["relative", "absolute"]
    below: float
    above: float

    def __post_init__(self) -> None:
        if self.kind not in ("relative", "absolute"):
            raise ValueError(f"tolerance kind must be 'relative' or 'absolute', got {self.kind!r}")
        for name in ("below", "above"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"tolerance {name} must be a finite number >= 0, got {value!r}")

    def allows(self, stored: float, recomputed: float) -> bool:
        if math.isinf(stored) or math.isinf(recomputed):
            return stored == recomputed
        scale = abs(stored) if self.kind == "relative" else 1.0
        return -self.below * scale <= recomputed - stored <= self.above * scale

    def describe(self) -> str:
        unit = "relative" if self.kind == "relative" else "in epsilon"
        if self.below == self.above:
            return f"±{self.below:g} {unit}"
        return f"-{self.below:g} to +{self.above:g} {unit}"


@dataclass(frozen=True)
class Recomputation:
    """The independent check of one ledger entry.

    ``agrees`` is ``None`` for a skipped (non-private) entry, else whether both
    ``epsilon_after`` and ``epsilon_round`` lie within ``tolerance`` of the recomputation.
    Differences are ``recomputed - stored`` for ``epsilon_after``.
    """

    seq: int
    node: str
    data_fingerprint: str
    mode: str
    accountant: str | None
    method: str
    delta: float | None
    stored_epsilon: float | None
    recomputed_epsilon: float | None
    stored_epsilon_round: float | None
    recomputed_epsilon_round: float | None
    absolute_difference: float | None
    relative_difference: float | None
    tolerance: Tolerance | None
    agrees: bool | None
    note: str

    @property
    def skipped(self) -> bool:
        return self.agrees is None


@dataclass(frozen=True)
class _Entry:
    index: int
    seq: int
    node: str
    data_fingerprint: str
    mode: str
    accountant: str | None = None
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    delta: float = 0.0
    epsilon_round: float = 0.0
    epsilon_after: float = 0.0


@dataclass
class _Replay:
    """One data set's history, composed so far under each method."""

    history: list[_Entry] = field(default_factory=list)
    rdp: np.ndarray = field(default_factory=lambda: np.zeros(len(OPACUS_RDP_ORDERS)))
    rdp_composed: int = 0
    pld: Any = None
    pld_composed: int = 0


class _Accountants:
    """dp-accounting's RDP and PLD for Poisson-subsampled Gaussian rounds, with caches."""

    def __init__(self) -> None:
        self._rdp_per_step: dict[tuple[float, float], np.ndarray] = {}
        self._round_pld: dict[tuple[float, float, int], Any] = {}

    def rdp_of_round(self, entry: _Entry) -> np.ndarray:
        key = (entry.noise_multiplier, entry.sample_rate)
        if key not in self._rdp_per_step:
            accountant = RdpAccountant(orders=OPACUS_RDP_ORDERS)
            accountant.compose(
                PoissonSampledDpEvent(entry.sample_rate, GaussianDpEvent(entry.noise_multiplier))
            )
            self._rdp_per_step[key] = accountant.rdp
        return entry.steps * self._rdp_per_step[key]

    def pld_of_round(self, entry: _Entry) -> Any:
        key = (entry.noise_multiplier, entry.sample_rate, entry.steps)
        if key not in self._round_pld:
            # What PLDAccountant.compose does for SelfComposed(PoissonSampled(Gaussian)).
            self._round_pld[key] = pld_lib.from_gaussian_mechanism(
                standard_deviation=entry.noise_multiplier,
                sampling_prob=entry.sample_rate,
                value_discretization_interval=PLD_DISCRETIZATION,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            ).self_compose(entry.steps)
        return self._round_pld[key]

    def epsilons(self, replay: _Replay, entry: _Entry) -> tuple[float, float]:
        """(epsilon_after, epsilon_round) of ``entry``, the last of ``replay.history``."""
        if entry.accountant == "rdp":
            for earlier in replay.history[replay.rdp_composed :]:
                replay.rdp = replay.rdp + self.rdp_of_round(earlier)
            replay.rdp_composed = len(replay.history)
            after = rdp_to_epsilon(OPACUS_RDP_ORDERS, replay.rdp, entry.delta)[0]
            alone = rdp_to_epsilon(OPACUS_RDP_ORDERS, self.rdp_of_round(entry), entry.delta)[0]
        else:
            if replay.pld is None:
                replay.pld = pld_lib.identity(value_discretization_interval=PLD_DISCRETIZATION)
            for earlier in replay.history[replay.pld_composed :]:
                replay.pld = replay.pld.compose(self.pld_of_round(earlier))
            replay.pld_composed = len(replay.history)
            after = replay.pld.get_epsilon_for_delta(entry.delta)
            alone = self.pld_of_round(entry).get_epsilon_for_delta(entry.delta)
        return float(after), float(alone)


def recompute_ledger(
    entries: Sequence[Mapping[str, Any]],
    *,
    rdp_tolerance: float = DEFAULT_RDP_TOLERANCE,
    rdp_fractional_allowance: float = DEFAULT_RDP_FRACTIONAL_ALLOWANCE,
    pld_tolerance: float = DEFAULT_PLD_TOLERANCE,
) -> list[Recomputation]:
    """One :class:`Recomputation` per entry, in the order of ``entries``.

    ``entries`` are ledger entries as plain dicts (as read from the JSONL export). Raises
    ``ValueError`` naming the entry and field when a parameter is missing or invalid, or when
    two entries of one node share a ``seq``.
    """
    for name, value in (
        ("rdp_tolerance", rdp_tolerance),
        ("rdp_fractional_allowance", rdp_fractional_allowance),
        ("pld_tolerance", pld_tolerance),
    ):
        if not (isinstance(value, int | float) and 0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    rdp = Tolerance(
        "relative", below=rdp_tolerance, above=max(rdp_tolerance, rdp_fractional_allowance)
    )
    pld = Tolerance("absolute", below=pld_tolerance, above=pld_tolerance)
    parsed = [_parse(index, entry) for index, entry in enumerate(entries)]

    seen: set[tuple[str, int]] = set()
    for entry in parsed:
        if (entry.node, entry.seq) in seen:
            raise ValueError(f"two entries of node {entry.node!r} have seq {entry.seq}")
        seen.add((entry.node, entry.seq))

    version = dp_accounting_version()
    accountants = _Accountants()
    replays: dict[tuple[str, str], _Replay] = {}
    results: dict[int, Recomputation] = {}
    for entry in sorted(parsed, key=lambda e: (e.node, e.data_fingerprint, e.seq)):
        if entry.mode != "dp":
            results[entry.index] = _skipped(entry)
            continue
        replay = replays.setdefault((entry.node, entry.data_fingerprint), _Replay())
        replay.history.append(entry)
        after, alone = accountants.epsilons(replay, entry)
        if entry.accountant == "rdp":
            method, tolerance = f"dp-accounting-{version} rdp", rdp
        else:
            method, tolerance = f"dp-accounting-{version} pld", pld
        results[entry.index] = _compare(entry, after, alone, method, tolerance)
    return [results[index] for index in range(len(parsed))]


def _compare(
    entry: _Entry, after: float, alone: float, method: str, tolerance: Tolerance
) -> Recomputation:
    difference = _difference(entry.epsilon_after, after)
    relative = _relative(entry.epsilon_after, difference)
    after_ok = tolerance.allows(entry.epsilon_after, after)
    round_ok = tolerance.allows(entry.epsilon_round, alone)
    if after_ok and round_ok:
        note = "agrees"
        if tolerance.kind == "relative" and not (
            relative is not None and abs(relative) <= tolerance.below
        ):
            note = (
                f"agrees: dp-accounting is {_percent(relative)} higher, within its "
                "conservative bias at fractional RDP orders"
            )
    else:
        wrong = [
            f"{name} stored {stored:.6g}, recomputed {recomputed:.6g}"
            for name, stored, recomputed, ok in (
                ("epsilon_after", entry.epsilon_after, after, after_ok),
                ("epsilon_round", entry.epsilon_round, alone, round_ok),
            )
            if not ok
        ]
        note = f"disagrees beyond {tolerance.describe()}: " + "; ".join(wrong)
    return Recomputation(
        seq=entry.seq,
        node=entry.node,
        data_fingerprint=entry.data_fingerprint,
        mode=entry.mode,
        accountant=entry.accountant,
        method=method,
        delta=entry.delta,
        stored_epsilon=entry.epsilon_after,
        recomputed_epsilon=after,
        stored_epsilon_round=entry.epsilon_round,
        recomputed_epsilon_round=alone,
        absolute_difference=difference,
        relative_difference=relative,
        tolerance=tolerance,
        agrees=after_ok and round_ok,
        note=note,
    )


def _skipped(entry: _Entry) -> Recomputation:
    return Recomputation(
        seq=entry.seq,
        node=entry.node,
        data_fingerprint=entry.data_fingerprint,
        mode=entry.mode,
        accountant=None,
        method="",
        delta=None,
        stored_epsilon=None,
        recomputed_epsilon=None,
        stored_epsilon_round=None,
        recomputed_epsilon_round=None,
        absolute_difference=None,
        relative_difference=None,
        tolerance=None,
        agrees=None,
        note="skipped: non-private round, no DP guarantee and no epsilon to recompute",
    )


def _difference(stored: float, recomputed: float) -> float:
    if math.isinf(stored) and stored == recomputed:
        return 0.0
    return recomputed - stored


def _relative(stored: float, difference: float) -> float | None:
    if difference == 0:
        return 0.0
    if stored == 0 or math.isinf(stored):
        return None
    return difference / abs(stored)


def _percent(relative: float | None) -> str:
    return "an unknown fraction" if relative is None else f"{relative:.3%}"


# ---------------------------------------------------------------------------- input checks


def _parse(index: int, raw: Mapping[str, Any]) -> _Entry:
    if not isinstance(raw, Mapping):
        raise ValueError(f"ledger entry #{index} is not a JSON object: {type(raw).__name__}")
    where = f"ledger entry #{index}"
    seq = _require(raw, "seq", where)
    if not _is_int(seq):
        raise ValueError(f"{where}: seq must be an integer, got {seq!r}")
    where = f"ledger entry seq {seq}"
    node = _text(raw, "node", where)
    data_fingerprint = _text(raw, "data_fingerprint", where)
    mode = _require(raw, "mode", where)
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "dp":
        return _Entry(index, seq, node, data_fingerprint, mode)

    accountant = _require(raw, "accountant", where)
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"{where}: accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}"
        )
    steps = _require(raw, "steps", where)
    if not (_is_int(steps) and steps > 0):
        raise ValueError(f"{where}: steps must be a positive integer, got {steps!r}")
    sample_rate = _number(raw, "sample_rate", where)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"{where}: sample_rate must be in (0, 1], got {sample_rate!r}")
    noise_multiplier = _number(raw, "noise_multiplier", where)
    if not (0 < noise_multiplier < math.inf):
        raise ValueError(f"{where}: noise_multiplier must be positive, got {noise_multiplier!r}")
    delta = _number(raw, "delta", where)
    if not 0 < delta < 1:
        raise ValueError(f"{where}: delta must be in (0, 1), got {delta!r}")
    epsilon_round = _epsilon(raw, "epsilon_round", where)
    epsilon_after = _epsilon(raw, "epsilon_after", where)
    return _Entry(
        index,
        seq,
        node,
        data_fingerprint,
        mode,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        epsilon_round=epsilon_round,
        epsilon_after=epsilon_after,
    )


def _require(raw: Mapping[str, Any], name: str, where: str) -> Any:
    value = raw.get(name)
    if value is None:
        raise ValueError(f"{where}: missing {name}")
    return value


def _text(raw: Mapping[str, Any], name: str, where: str) -> str:
    value = _require(raw, name, where)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value


def _number(raw: Mapping[str, Any], name: str, where: str) -> float:
    value = _require(raw, name, where)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    return float(value)


def _epsilon(raw: Mapping[str, Any], name: str, where: str) -> float:
    value = _number(raw, name, where)
    if value < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
