"""The math of the canary audit on crafted inputs: exposure (Carlini et al. 2019) and the
one-run epsilon lower bound (Steinke, Nasr and Jagielski 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from fedtune.privacy.audit.empirical import (
    audit_membership,
    epsilon_lower_bound,
    exposure,
    extrapolated_exposure,
    guess_counts,
    p_value,
    sampled_exposure,
    sampled_rank,
)


def test_exposure_is_the_space_in_bits_at_rank_one_and_zero_at_the_last_rank():
    assert exposure(1, 2**20) == pytest.approx(20.0)
    assert exposure(2**20, 2**20) == pytest.approx(0.0)
    assert exposure(1024, 2**20) == pytest.approx(10.0)


def test_a_rank_outside_the_space_is_refused():
    with pytest.raises(ValueError, match="rank"):
        exposure(0, 100)


def test_the_sampled_rank_counts_ties_against_the_canary():
    assert sampled_rank(1.0, [2.0, 3.0]) == 1
    assert sampled_rank(2.0, [2.0, 3.0]) == 2
    assert sampled_exposure(0.5, [1.0] * 127) == pytest.approx(7.0)  # log2(128): saturates


def test_a_canary_no_more_likely_than_random_has_about_log2_e_bits_in_the_sample():
    # Carlini et al.: for a canary drawn like the candidates, exposure averages 1/ln 2 bits.
    rng = np.random.default_rng(0)
    values = [sampled_exposure(rng.normal(), rng.normal(size=255)) for _ in range(2000)]
    assert np.mean(values) == pytest.approx(1 / math.log(2), abs=0.1)


def test_extrapolation_reaches_past_the_sample_and_stops_at_the_space():
    rng = np.random.default_rng(1)
    candidates = rng.normal(3.0, 0.3, size=200)
    # Seven standard deviations below: far beyond what 200 candidates can rank.
    far = extrapolated_exposure(3.0 - 7 * 0.3, candidates, space_size=10**6)
    assert far > sampled_exposure(3.0 - 7 * 0.3, candidates) + 5
    assert far <= math.log2(10**6)
    assert extrapolated_exposure(-100.0, candidates, space_size=10**6) == pytest.approx(
        math.log2(10**6)
    )
    assert extrapolated_exposure(3.0, candidates, space_size=10**6) == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("guesses", [10, 20, 50, 100])
def test_all_guesses_right_gives_the_randomized_response_bound(guesses):
    # With delta = 0 and v = r, the p-value is q^r: the bound is logit(0.05^(1/r)).
    expected = special.logit(0.05 ** (1 / guesses))

    bound = epsilon_lower_bound(m=1000, r=guesses, v=guesses, delta=0.0)

    assert bound == pytest.approx(expected, rel=1e-5)


def test_the_bound_grows_with_the_number_of_correct_guesses():
    bounds = [epsilon_lower_bound(m=1000, r=r, v=r, delta=1e-5) for r in (5, 10, 20, 50, 100)]
    assert bounds == sorted(bounds)
    assert bounds[0] > 0
    assert 3.4 < bounds[-1] < 3.5  # 100 of 100: about 3.47 (3.49 without the delta term)


def test_half_right_proves_nothing():
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=1000, r=100, v=55, delta=1e-5) == 0.0


def test_delta_only_ever_weakens_the_bound():
    without = epsilon_lower_bound(m=1000, r=100, v=90, delta=0.0)
    with_delta = epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-4)
    assert 0 < with_delta < without


def test_the_p_value_is_the_binomial_tail_without_delta():
    assert p_value(m=100, r=10, v=8, epsilon=1.0, delta=0.0) == pytest.approx(
        sum(
            math.comb(10, k) * special.expit(1.0) ** k * special.expit(-1.0) ** (10 - k)
            for k in range(8, 11)
        )
    )


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError, match="correct"):
        p_value(m=10, r=5, v=6, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(m=10, r=5, v=5, delta=0.0, confidence=1.0)


def test_perfectly_separated_scores_give_a_clearly_positive_bound():
    included = np.arange(128) % 2 == 0
    scores = included.astype(float) + np.linspace(0, 0.1, 128)

    audit = audit_membership(scores, included, delta=1e-5)

    assert audit.correct == audit.guesses
    assert audit.epsilon_lower_bound > 2.5
    assert audit.tried == len(guess_counts(128))


def test_scores_unrelated_to_membership_give_about_zero():
    rng = np.random.default_rng(3)
    bounds = [
        audit_membership(
            rng.normal(size=128), rng.random(128) < 0.5, delta=1e-5
        ).epsilon_lower_bound
        for _ in range(50)
    ]
    # At 95% confidence with a Bonferroni correction, a positive bound is rare and small.
    assert sum(b > 0 for b in bounds) <= 3
    assert max(bounds) < 0.5


def test_scores_and_flags_must_match():
    with pytest.raises(ValueError, match="one inclusion flag"):
        audit_membership([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(ValueError, match="finite"):
        audit_membership([1.0, float("nan")], [True, False], delta=1e-5)
