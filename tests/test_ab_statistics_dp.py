"""A/B statistics released under DP: the noisy sums are made consistent, and the interval
carries the noise, so it is wider and still covers the true difference as often as stated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.coordinator.ab_statistics import PairedSummary, combine_summaries, compare_summary


def test_noisy_sums_are_made_consistent():
    summary = PairedSummary.from_noisy(n=-3.2, sum_a=1.0, sum_b=2.0, sum_d2=-5.0, noise_sd_sum=2)
    assert (summary.n, summary.sum_d, summary.sum_d2) == (0, 0.0, 0.0)
    raised = PairedSummary.from_noisy(n=10.4, sum_a=0.0, sum_b=5.0, sum_d2=0.1, noise_sd_sum=2)
    assert raised.n == 10 and raised.sum_d2 >= 25.0 / 10
    assert raised.noise_var_sum_d == pytest.approx(8.0)


def test_the_dp_interval_is_wider_than_the_exact_one_and_says_why():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, 500), rng.uniform(0, 1, 500)
    exact = PairedSummary.of(a.tolist(), b.tolist(), binary=False)
    noisy = PairedSummary.from_noisy(
        n=exact.n, sum_a=exact.sum_a, sum_b=exact.sum_b, sum_d2=exact.sum_d2, noise_sd_sum=10.0
    )

    plain, private = compare_summary("rouge-l", exact), compare_summary("rouge-l", noisy)

    assert private.ci_high - private.ci_low > plain.ci_high - plain.ci_low
    assert private.test == "paired t-test (DP)" and "differential privacy" in private.detail["note"]


def test_a_noisy_summary_pools_with_exact_binary_ones_without_counts():
    exact = PairedSummary.of([0, 1, 1, 0], [1, 1, 0, 1], binary=True)
    noisy = PairedSummary.from_noisy(n=4.3, sum_a=2.2, sum_b=2.9, sum_d2=2.5, noise_sd_sum=1.0)

    pooled = combine_summaries([exact, noisy])

    assert pooled.n == 8 and not pooled.binary and pooled.noise_var_sum_d == pytest.approx(2.0)
    assert compare_summary("exact-match", pooled).test == "paired t-test (DP)"


def test_the_dp_interval_covers_the_true_difference_as_often_as_stated():
    """The node's mechanism simulated: rows (1, a, b, (b - a)^2) in [0, 1], each sum plus
    Gaussian noise of sigma * sqrt(4); the population's mean difference is 0.1."""
    rng = np.random.default_rng(1)
    sigma, n, trials, covered = 2.0, 300, 400, 0
    std = sigma * math.sqrt(4)
    for _ in range(trials):
        a = rng.uniform(0.1, 0.7, n)  # b stays in [0, 1]: no clipping bias
        b = np.clip(a + 0.1 + rng.uniform(-0.2, 0.2, n), 0, 1)
        noise = rng.normal(0.0, std, 4)
        summary = PairedSummary.from_noisy(
            n=n + noise[0],
            sum_a=a.sum() + noise[1],
            sum_b=b.sum() + noise[2],
            sum_d2=((b - a) ** 2).sum() + noise[3],
            noise_sd_sum=std,
        )
        result = compare_summary("rouge-l", summary)
        covered += result.ci_low <= 0.1 <= result.ci_high
    assert 0.92 <= covered / trials <= 0.99
