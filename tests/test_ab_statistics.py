"""Paired A/B statistics: the right paired test per metric, honest false-positive rates, exact
pooling of node summaries, Holm correction, and clear errors on bad input."""

import json
import math

import numpy as np
import pytest
from flwr.app import MetricRecord
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from fedtune.coordinator.ab_statistics import (
    METRICS,
    Comparison,
    PairedSummary,
    apply_holm,
    combine_summaries,
    compare_paired,
    compare_summary,
    holm,
)

SIMULATIONS = 400
PAIRS = 60
ALPHA = 0.05


def loss_scores(n: int, *, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example losses of A around 3 nats, and B = A + shift + small per-example noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(3.0, 0.5, n)
    return a, a + shift + rng.normal(0.0, 0.2, n)


def rouge_scores(n: int, *, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ROUGE-L on a 0.1 grid with many ties: 30% of examples get the same generation from A and
    B; otherwise both score around the example's difficulty, B shifted by ``shift``."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(0.0, 1.0, n)
    a = np.clip(np.round(quality + rng.normal(0.0, 0.15, n), 1), 0.0, 1.0)
    b = np.clip(np.round(quality + shift + rng.normal(0.0, 0.15, n), 1), 0.0, 1.0)
    same = rng.uniform(size=n) < 0.3
    b[same] = a[same]
    return a, b


def match_scores(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact match 0/1 of two equally good versions: each example has its own difficulty."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, n)
    return (rng.uniform(size=n) < p).astype(float), (rng.uniform(size=n) < p).astype(float)


def comparison(p_value: float | None, difference: float = 0.1) -> Comparison:
    return Comparison(
        metric="rouge-l",
        higher_is_better=True,
        examples=100,
        mean_a=0.5,
        mean_b=0.5 + difference,
        difference=difference,
        ci_low=None,
        ci_high=None,
        confidence=0.95,
        test="Wilcoxon signed-rank + paired bootstrap CI",
        p_value=p_value,
        p_adjusted=None,
        verdict="too few examples" if p_value is None else "b better",
    )


def binomial_band(rate: float, trials: int) -> tuple[float, float]:
    """99% band of an observed rejection rate when the true rate is ``rate``."""
    low, high = stats.binom.ppf([0.005, 0.995], trials, rate)
    return low / trials, high / trials


# --- each metric's test finds a real difference -------------------------------------------


def test_lower_loss_of_b_is_found_with_a_t_interval_around_the_true_difference() -> None:
    a, b = loss_scores(200, shift=-0.1, seed=1)

    result = compare_paired("loss", a, b)

    assert result.test == "paired t-test"
    assert result.verdict == "b better"
    assert result.ci_low is not None and result.ci_high is not None
    assert result.ci_low < -0.1 < result.ci_high < 0.0


def test_higher_loss_of_b_is_a_better() -> None:
    a, b = loss_scores(200, shift=0.1, seed=2)

    result = compare_paired("loss", a, b)

    assert result.verdict == "a better"
    assert result.difference is not None and result.difference > 0


def test_rouge_gain_is_found_by_wilcoxon_with_a_bootstrap_ci_around_the_true_difference() -> None:
    a, b = rouge_scores(400, shift=0.1, seed=3)
    big_a, big_b = rouge_scores(200_000, shift=0.1, seed=4)
    true_difference = float(np.mean(big_b - big_a))

    result = compare_paired("rouge-l", a, b)

    assert result.test == "Wilcoxon signed-rank + paired bootstrap CI"
    assert result.verdict == "b better"
    assert result.ci_low is not None and result.ci_high is not None
    assert 0.0 < result.ci_low < true_difference < result.ci_high
    assert result.detail["ties"] > 0
    assert result.detail["bootstrap_resamples"] == 10_000


def test_bootstrap_ci_is_reproducible_for_a_seed() -> None:
    a, b = rouge_scores(100, shift=0.05, seed=5)

    first = compare_paired("rouge-l", a, b, seed=7)
    again = compare_paired("rouge-l", a, b, seed=7)
    other = compare_paired("rouge-l", a, b, seed=8)

    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)


def test_small_node_with_tied_rouge_gets_a_permutation_p_value_close_to_the_exact_one() -> None:
    a = np.array([0.5, 0.4, 0.6, 0.3, 0.7, 0.5, 0.2, 0.6, 0.4, 0.5, 0.7, 0.3, 0.6, 0.5])
    gain = np.array([0.1, 0.2, 0.1, 0.0, 0.3, -0.1, 0.2, 0.1, 0.1, 0.2, 0.2, 0.0, 0.1, 0.2])
    b = a + gain  # floating-point noise in b - a must not break the ties of gain
    exact = stats.wilcoxon(
        gain, zero_method="pratt", method=stats.PermutationMethod(n_resamples=2**14)
    ).pvalue

    result = compare_paired("rouge-l", a, b)

    assert result.detail["p_value_method"].startswith("sign-flip permutation")
    assert result.p_value == pytest.approx(exact, abs=0.003)


def test_exact_match_gain_is_tested_by_exact_mcnemar_on_discordant_pairs() -> None:
    a = [0.0] * 8 + [1.0] * 1 + [1.0] * 11
    b = [1.0] * 8 + [0.0] * 1 + [1.0] * 11

    result = compare_paired("exact-match", a, b)

    assert result.test == "McNemar exact"
    assert result.p_value == pytest.approx(2 * (1 + 9) / 2**9)  # P(X <= 1 or X >= 8), X~B(9,½)
    assert result.difference == pytest.approx(7 / 20)
    assert result.verdict == "b better"


def test_paired_proportion_ci_matches_newcombe_hybrid_score_reference() -> None:
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8:
    # table [[59, 6], [16, 80]] -> difference -0.0621, 95% CI -0.1186 to -0.0046.
    summary = PairedSummary(
        n=161, sum_a=75.0, sum_b=65.0, sum_d=-10.0, sum_d2=22.0, b_only=6, a_only=16
    )

    result = compare_summary("exact-match", summary)

    assert result.difference == pytest.approx(-0.0621, abs=5e-5)
    assert result.ci_low == pytest.approx(-0.1186, abs=5e-5)
    assert result.ci_high == pytest.approx(-0.0046, abs=5e-5)


# --- no difference: false positives stay near alpha ---------------------------------------


def test_paired_t_test_false_positive_rate_is_near_alpha() -> None:
    rejections = [
        compare_paired("loss", *loss_scores(PAIRS, shift=0.0, seed=seed)).p_value <= ALPHA
        for seed in range(SIMULATIONS)
    ]

    low, high = binomial_band(ALPHA, SIMULATIONS)
    assert low <= np.mean(rejections) <= high


def test_wilcoxon_false_positive_rate_is_near_alpha_with_many_ties() -> None:
    rejections = [
        compare_paired("rouge-l", *rouge_scores(PAIRS, shift=0.0, seed=seed), bootstrap=500).p_value
        <= ALPHA
        for seed in range(SIMULATIONS)
    ]

    low, high = binomial_band(ALPHA, SIMULATIONS)
    assert low <= np.mean(rejections) <= high


def test_wilcoxon_permutation_false_positive_rate_is_near_alpha_on_small_nodes() -> None:
    rejections = [
        compare_paired("rouge-l", *rouge_scores(30, shift=0.0, seed=seed), bootstrap=100).p_value
        <= ALPHA
        for seed in range(SIMULATIONS)
    ]

    low, high = binomial_band(ALPHA, SIMULATIONS)
    assert low <= np.mean(rejections) <= high


def test_exact_mcnemar_false_positive_rate_is_at_most_alpha() -> None:
    rejections = [
        compare_paired("exact-match", *match_scores(PAIRS, seed=seed)).p_value <= ALPHA
        for seed in range(SIMULATIONS)
    ]

    _, high = binomial_band(ALPHA, SIMULATIONS)
    assert np.mean(rejections) <= high  # exact McNemar is conservative


# --- pairing is where the power is --------------------------------------------------------


def test_paired_test_is_far_more_powerful_than_welch_on_correlated_pairs() -> None:
    a, b = loss_scores(500, shift=-0.1, seed=11)
    welch = stats.ttest_ind(b, a, equal_var=False).pvalue

    paired = compare_paired("loss", a, b).p_value

    assert paired is not None
    assert welch > 1e-4
    assert paired < 1e-15 * welch


# --- sufficient statistics ----------------------------------------------------------------


def test_summary_t_test_equals_per_example_t_test() -> None:
    a, b = loss_scores(50, shift=-0.06, seed=12)

    from_scores = compare_paired("loss", a, b)
    from_summary = compare_summary("loss", PairedSummary.of(a, b, binary=False))

    for field in ("p_value", "ci_low", "ci_high", "difference", "mean_a", "mean_b"):
        expected, actual = getattr(from_scores, field), getattr(from_summary, field)
        assert math.isclose(actual, expected, rel_tol=1e-9), field
    assert from_summary.verdict == from_scores.verdict
    assert from_summary.detail["per_example"] is False


def test_rouge_summary_falls_back_to_t_test_and_says_only_statistics_were_shared() -> None:
    a, b = rouge_scores(100, shift=0.05, seed=13)

    result = compare_summary("rouge-l", PairedSummary.of(a, b, binary=False))

    assert result.test == "paired t-test"
    assert "only sufficient statistics" in result.detail["note"]


def test_pooled_node_summaries_equal_summary_of_concatenated_scores() -> None:
    a1, b1 = loss_scores(40, shift=-0.1, seed=14)
    a2, b2 = loss_scores(70, shift=0.0, seed=15)
    node1, node2 = PairedSummary.of(a1, b1, binary=False), PairedSummary.of(a2, b2, binary=False)

    pooled = node1.combine([node2])
    together = PairedSummary.of(np.r_[a1, a2], np.r_[b1, b2], binary=False)

    assert pooled.n == together.n == 110
    for field in ("sum_a", "sum_b", "sum_d", "sum_d2"):
        assert math.isclose(getattr(pooled, field), getattr(together, field), rel_tol=1e-12)
    pooled_p = compare_summary("loss", pooled).p_value
    assert math.isclose(pooled_p, compare_paired("loss", np.r_[a1, a2], np.r_[b1, b2]).p_value)


def test_pooled_binary_summaries_give_the_mcnemar_test_of_all_examples() -> None:
    a1, b1 = match_scores(30, seed=16)
    a2, b2 = match_scores(50, seed=17)

    pooled = combine_summaries(
        [PairedSummary.of(a1, b1, binary=True), PairedSummary.of(a2, b2, binary=True)]
    )

    assert pooled == PairedSummary.of(np.r_[a1, a2], np.r_[b1, b2], binary=True)
    direct = compare_paired("exact-match", np.r_[a1, a2], np.r_[b1, b2])
    from_summary = compare_summary("exact-match", pooled)
    assert (from_summary.p_value, from_summary.ci_low) == (direct.p_value, direct.ci_low)


def test_summary_travels_as_a_flat_flower_metric_record() -> None:
    a, b = match_scores(25, seed=18)
    summary = PairedSummary.of(a, b, binary=True)

    record = MetricRecord(summary.to_dict())
    received = PairedSummary.from_dict(json.loads(json.dumps(dict(record))))

    assert received == summary
    assert all(type(value) in (int, float) for value in summary.to_dict().values())


def test_continuous_summary_has_no_discordant_counts_in_its_record() -> None:
    summary = PairedSummary.of([1.0, 2.0], [1.5, 2.5], binary=False)

    assert set(summary.to_dict()) == {"n", "sum_a", "sum_b", "sum_d", "sum_d2"}
    assert PairedSummary.from_dict(summary.to_dict()) == summary


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(n=3, sum_a=1.0, sum_b=2.0, sum_d=1.0, sum_d2=-1.0), "impossible"),
        (dict(n=3, sum_a=1.0, sum_b=4.0, sum_d=3.0, sum_d2=2.0), "impossible"),
        (dict(n=3, sum_a=1.0, sum_b=2.0, sum_d=5.0, sum_d2=30.0), "sum_b - sum_a"),
        (dict(n=3, sum_a=1.0, sum_b=2.0, sum_d=1.0, sum_d2=1.0, b_only=2, a_only=0), "binary"),
        (dict(n=3, sum_a=1.0, sum_b=2.0, sum_d=1.0, sum_d2=1.0, b_only=1), "both"),
        (dict(n=-1, sum_a=0.0, sum_b=0.0, sum_d=0.0, sum_d2=0.0), "non-negative"),
        (dict(n=3, sum_a=math.nan, sum_b=2.0, sum_d=1.0, sum_d2=1.0), "finite"),
    ],
)
def test_malformed_summary_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PairedSummary(**fields)


def test_binary_and_continuous_summaries_do_not_combine() -> None:
    binary = PairedSummary.of([0.0, 1.0], [1.0, 1.0], binary=True)
    continuous = PairedSummary.of([0.0, 1.0], [1.0, 1.0], binary=False)

    with pytest.raises(ValueError, match="cannot combine binary"):
        binary.combine([continuous])


def test_summary_of_the_wrong_kind_for_the_metric_is_refused() -> None:
    continuous = PairedSummary.of([0.0, 1.0, 1.0], [1.0, 1.0, 0.0], binary=False)

    with pytest.raises(ValueError, match="lacks the discordant counts"):
        compare_summary("exact-match", continuous)


def test_summary_record_with_unknown_key_is_refused() -> None:
    record = {"n": 2, "sum_a": 1.0, "sum_b": 1.0, "sum_d": 0.0, "sum_d2": 0.0, "sum_e": 1.0}

    with pytest.raises(ValueError, match=r"unknown \['sum_e'\]"):
        PairedSummary.from_dict(record)


# --- degenerate data ----------------------------------------------------------------------


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_examples_is_too_few_without_crashing(metric: str, n: int) -> None:
    result = compare_paired(metric, [1.0] * n, [0.0] * n)

    assert result.verdict == "too few examples"
    assert result.p_value is None and result.ci_low is None
    assert result.examples == n


def test_no_discordant_pairs_means_p_one_and_no_difference() -> None:
    result = compare_paired("exact-match", [1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0])

    assert result.p_value == 1.0
    assert result.verdict == "no significant difference"


def test_identical_rouge_scores_give_p_one() -> None:
    result = compare_paired("rouge-l", [0.5, 0.2, 0.9], [0.5, 0.2, 0.9])

    assert result.p_value == 1.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)


# --- Holm ---------------------------------------------------------------------------------


def test_holm_matches_hand_computed_example() -> None:
    adjusted = holm([0.01, 0.04, 0.03])

    assert adjusted == pytest.approx([0.03, 0.06, 0.06])


def test_holm_passes_none_through_and_caps_at_one() -> None:
    adjusted = holm([None, 0.6, 0.01, 0.7])

    assert adjusted[0] is None
    assert adjusted[1:] == pytest.approx([1.0, 0.03, 1.0])


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=12))
def test_holm_is_monotone_at_least_raw_and_at_most_one(p_values: list[float]) -> None:
    adjusted = holm(p_values)

    pairs = list(zip(p_values, adjusted, strict=True))
    for raw, adj in pairs:
        assert adj is not None and raw <= adj <= 1.0
    for raw_i, adj_i in pairs:
        for raw_j, adj_j in pairs:
            if raw_i < raw_j:
                assert adj_i is not None and adj_j is not None and adj_i <= adj_j


def test_holm_refuses_nan() -> None:
    with pytest.raises(ValueError, match="must lie in"):
        holm([0.01, math.nan])


def test_apply_holm_turns_verdicts_insignificant_when_adjusted_p_exceeds_alpha() -> None:
    comparisons = [comparison(0.01), comparison(0.04), comparison(0.03), comparison(None)]

    adjusted = apply_holm(comparisons, alpha=0.05)

    assert [c.p_adjusted for c in adjusted] == pytest.approx([0.03, 0.06, 0.06, None])
    assert [c.verdict for c in adjusted] == [
        "b better",
        "no significant difference",
        "no significant difference",
        "too few examples",
    ]
    assert adjusted[0].detail["holm_family_size"] == 3


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "a", "b", "options", "message"),
    [
        ("loss", [1.0, 2.0, 3.0], [1.0, 2.0], {}, "a has 3 scores, b has 2"),
        ("loss", [1.0, math.nan, 3.0], [1.0, 2.0, 3.0], {}, "non-finite"),
        ("rouge-l", [0.1, 0.2], [0.3, math.inf], {}, "non-finite"),
        ("bleu", [0.1, 0.2], [0.3, 0.4], {}, "unknown metric 'bleu'.*exact-match, loss, pref"),
        ("loss", [1.0, 2.0], [1.0, 2.0], {"alpha": 0.0}, "alpha must be strictly between"),
        ("loss", [1.0, 2.0], [1.0, 2.0], {"alpha": 1.0}, "alpha must be strictly between"),
        ("loss", [1.0, 2.0], [1.0, 2.0], {"alpha": -0.1}, "alpha must be strictly between"),
        ("loss", [1.0, 2.0], [1.0, 2.0], {"alpha": math.nan}, "alpha must be strictly between"),
        ("exact-match", [0.0, 0.5], [1.0, 1.0], {}, "must be 0 or 1"),
        ("rouge-l", [45.0, 30.0], [50.0, 31.0], {}, r"must lie in \[0.0, 1.0\]"),
        ("loss", [-1.0, 2.0], [1.0, 2.0], {}, r"must lie in \[0.0, inf\]"),
        ("rouge-l", [0.1, 0.2], [0.3, 0.4], {"bootstrap": 10}, "bootstrap must be"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(
    metric: str, a: list[float], b: list[float], options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compare_paired(metric, a, b, **options)


def test_summary_comparison_refuses_alpha_outside_unit_interval() -> None:
    summary = PairedSummary.of([1.0, 2.0], [1.5, 2.0], binary=False)

    with pytest.raises(ValueError, match="alpha"):
        compare_summary("loss", summary, alpha=1.5)
