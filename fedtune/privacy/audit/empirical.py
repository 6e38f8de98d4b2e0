"""Empirical privacy measurements from planted canaries: pure functions, no model.

- **Exposure** (Carlini et al. 2019, "The Secret Sharer", section 4): a canary drawn from a
  space ``R`` of secrets of one format has exposure ``log2|R| - log2(rank)``, where ``rank``
  is its place (1 = most likely) among all secrets of ``R`` ordered by the model's loss.
  Ranking all of a large ``R`` costs a forward pass per secret, so the rank is estimated from
  a uniform sample of candidates (:func:`sampled_exposure`: at most ``log2(C + 1)`` bits for
  ``C`` candidates) and, beyond that, extrapolated from a skew-normal fitted to the
  candidates' losses (:func:`extrapolated_exposure`, the paper's section 4.3 approach).
- **Epsilon lower bound from one training run** (Steinke, Nasr and Jagielski 2023,
  "Privacy auditing with one (1) training run", Theorem 3.1 with abstentions and
  Proposition 5.7's delta term): ``m`` canaries are each included independently with
  probability 1/2; the auditor guesses "in" for the ``k+`` highest scores and "out" for the
  ``k-`` lowest and abstains on the rest. Under (epsilon, delta)-DP the number of correct
  guesses is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) plus a delta
  term; a count of correct guesses improbable under that for every eps below some value
  bounds epsilon from below at the stated confidence (:func:`epsilon_lower_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

# Past this, the p-value is below any confidence a user asks for: the search stops here.
MAX_EPSILON = 50.0


def exposure(rank: float, space_size: float) -> float:
    """``log2(space_size) - log2(rank)``: 0 for the least likely secret, ``log2|R|`` for the
    most likely one (rank 1)."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank must lie in [1, {space_size:g}], not {rank:g}")
    return math.log2(space_size) - math.log2(rank)


def sampled_rank(canary_loss: float, candidate_losses: Sequence[float]) -> int:
    """The canary's rank among itself and the candidates (1 = lowest loss); a tie counts
    against the canary (its rank is the pessimistic one)."""
    losses = np.asarray(candidate_losses, dtype=float)
    return 1 + int(np.count_nonzero(losses <= canary_loss))


def sampled_exposure(canary_loss: float, candidate_losses: Sequence[float]) -> float:
    """Exposure measured within the sample: the canary ranked among ``C`` candidates drawn
    uniformly from the secret space. It estimates ``-log2`` of the share of the space that
    the model finds at least as likely, and saturates at ``log2(C + 1)``."""
    return exposure(sampled_rank(canary_loss, candidate_losses), len(candidate_losses) + 1)


def extrapolated_exposure(
    canary_loss: float, candidate_losses: Sequence[float], *, space_size: float
) -> float:
    """Exposure from a skew-normal fitted to the candidates' losses (Carlini et al. 2019,
    section 4.3): ``-log2 P[loss <= canary loss]`` under the fit, which reaches past the
    sample's ``log2(C + 1)``; capped at ``log2(space_size)`` (rank 1)."""
    losses = np.asarray(candidate_losses, dtype=float)
    if losses.size < 3 or float(np.ptp(losses)) == 0.0:
        raise ValueError("a skew-normal fit needs at least 3 distinct candidate losses")
    shape, location, scale = stats.skewnorm.fit(losses)
    log_share = float(stats.skewnorm.logcdf(canary_loss, shape, location, scale))
    bits = -log_share / math.log(2)
    return float(min(max(bits, 0.0), math.log2(space_size)))


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` (the rest of the ``m``
    canaries abstained on) if training was (epsilon, delta)-DP (Steinke et al. 2023,
    Theorem 3.1 / Proposition 5.7): ``P[Binomial(r, q) >= v] + 2 m delta max_i P[v > B >= v -
    i] / i`` with ``q = e^eps / (1 + e^eps)``."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and 0 <= delta <= 1")
    q = float(special.expit(epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))
    slack = 0.0
    if delta > 0 and v > 0:
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # v-1, v-2, ..., 0
        slack = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * slack, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` rule out at
    ``confidence``: no (epsilon', delta)-DP training with epsilon' below it gives that many
    correct guesses with probability ``1 - confidence`` or more. 0 when even epsilon = 0
    explains them."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    level = 1 - confidence

    def gap(epsilon: float) -> float:
        return p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) - level

    if gap(0.0) >= 0:
        return 0.0
    if gap(MAX_EPSILON) < 0:
        return MAX_EPSILON
    # The p-value grows with epsilon: one crossing.
    return float(optimize.brentq(gap, 0.0, MAX_EPSILON, xtol=1e-6))


@dataclass(frozen=True)
class MembershipAudit:
    """The one-run audit's outcome: the best of the guess counts tried, each tested at
    ``(1 - confidence) / tried`` (Bonferroni), so the bound holds at ``confidence``."""

    canaries: int  # m
    included: int
    guesses_in: int  # k+
    guesses_out: int  # k-
    correct: int  # v, of r = k+ + k- guesses
    epsilon_lower_bound: float
    confidence: float
    delta: float
    tried: int

    @property
    def guesses(self) -> int:
        return self.guesses_in + self.guesses_out


def guess_counts(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) pairs tried: both ends at a few shares of m/2, and "in" guesses only
    (a training loss falls for members; a high score is the sharper signal)."""
    half = max(1, m // 2)
    sizes = sorted({max(1, round(half * share)) for share in (0.1, 0.25, 0.5, 1.0)})
    return [(k, k) for k in sizes] + [(k, 0) for k in sizes]


def audit_membership(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    confidence: float = 0.95,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> MembershipAudit:
    """Guess membership from ``scores`` (higher: more likely a member; e.g. how much a
    canary's loss fell in training) and bound epsilon from the correct guesses.

    ``pairs`` are the (k+, k-) guess counts to try (default :func:`guess_counts`); the
    reported one is the pair with the largest bound, each tested at the Bonferroni-corrected
    level, so trying several costs a little power and never validity."""
    values = np.asarray(scores, dtype=float)
    truth = np.asarray(included, dtype=bool)
    m = values.size
    if m == 0 or truth.size != m:
        raise ValueError("need one inclusion flag per score, and at least one canary")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite")
    pairs = list(pairs) if pairs is not None else guess_counts(m)
    if not pairs or any(k_in < 0 or k_out < 0 or k_in + k_out > m for k_in, k_out in pairs):
        raise ValueError(f"each (k+, k-) needs k+, k- >= 0 and k+ + k- <= {m}")
    order = np.argsort(-values, kind="stable")  # highest score first
    each = 1 - (1 - confidence) / len(pairs)
    best: MembershipAudit | None = None
    for k_in, k_out in pairs:
        correct = int(truth[order[:k_in]].sum()) + int((~truth[order[m - k_out :]]).sum())
        bound = epsilon_lower_bound(m=m, r=k_in + k_out, v=correct, delta=delta, confidence=each)
        found = MembershipAudit(
            canaries=m,
            included=int(truth.sum()),
            guesses_in=k_in,
            guesses_out=k_out,
            correct=correct,
            epsilon_lower_bound=bound,
            confidence=confidence,
            delta=delta,
            tried=len(pairs),
        )
        if best is None or bound > best.epsilon_lower_bound:
            best = found
    assert best is not None
    return best
