"""Preference metrics at the coordinator: A/B tests compare preference accuracy with the
exact McNemar test and the reward margin with a paired (Wilcoxon signed-rank) test; model
health pools the nodes' held-out pairs and alerts when the accuracy keeps falling; a node
releasing under DP clips margins to their stated range."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from scipy import stats

from fedtune.client_node.metric_policy import dp_scores_content
from fedtune.coordinator.ab_statistics import PairedSummary, compare_paired, compare_summary
from fedtune.coordinator.health import preference_alerts, preference_signals
from fedtune.platform.config import (
    DataConfig,
    ModelConfig,
    NodeConfig,
    NodeSettings,
    PrivacySettings,
)
from fedtune.privacy.node_ledger import NodeLedger


def test_preference_accuracy_is_compared_with_the_exact_mcnemar_test():
    a = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    b = [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]  # B right where A was wrong 7 times, never worse

    result = compare_paired("preference-accuracy", a, b)

    assert result.test == "McNemar exact"
    assert result.p_value == pytest.approx(stats.binomtest(7, 7).pvalue)
    assert result.verdict == "b better" and result.difference == pytest.approx(7 / 12)


def test_preference_accuracy_scores_must_be_right_or_wrong():
    with pytest.raises(ValueError, match="must be 0 or 1"):
        compare_paired("preference-accuracy", [0.5, 1.0], [1.0, 1.0])


def test_reward_margin_is_compared_with_the_wilcoxon_signed_rank_test():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 20)
    b = a + rng.normal(0.4, 0.5, 20)  # negative margins too: the range is unbounded

    result = compare_paired("reward-margin", a, b)

    assert result.test.startswith("Wilcoxon signed-rank")
    assert result.p_value == pytest.approx(stats.wilcoxon(b - a, zero_method="pratt").pvalue)
    assert result.higher_is_better and result.verdict == "b better"
    assert result.ci_low < float(np.mean(b - a)) < result.ci_high


def test_a_node_sharing_only_statistics_still_gets_mcnemar_and_a_paired_t_test():
    a = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    b = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    margins_a, margins_b = [0.1, -0.2, 0.3, 0.0, 0.5, -0.1], [0.6, 0.2, 0.9, 0.1, 1.2, 0.3]

    accuracy = compare_summary("preference-accuracy", PairedSummary.of(a, b, binary=True))
    margin = compare_summary("reward-margin", PairedSummary.of(margins_a, margins_b, binary=False))

    assert accuracy.test == "McNemar exact" and accuracy.detail["b_only"] == 3
    expected = stats.ttest_rel(margins_b, margins_a).pvalue
    assert margin.test == "paired t-test" and margin.p_value == pytest.approx(expected)


def test_health_pools_the_nodes_pairs_and_leaves_out_nodes_without_pairs():
    replies = {
        "hospital": {"held-out-pairs": 30, "preference-accuracy": 0.8, "reward-margin": 1.0},
        "bank": {"held-out-pairs": 10, "preference-accuracy": 0.4, "reward-margin": -1.0},
        "clinic": {"held-out-loss": 2.0},  # conversations only
    }

    signals, accuracy = preference_signals(replies)

    by_key = {(s.signal, s.node_name): s.value for s in signals}
    assert accuracy == pytest.approx(0.7)  # (24 + 4) / 40
    assert by_key[("preference-accuracy", None)] == pytest.approx(0.7)
    assert by_key[("reward-margin", None)] == pytest.approx(0.5)  # (30 - 10) / 40
    assert by_key[("preference-accuracy", "bank")] == 0.4
    assert not any(s.node_name == "clinic" for s in signals)


def test_a_run_without_preference_pairs_has_no_preference_signal():
    assert preference_signals({"hospital": {"held-out-loss": 2.0}}) == ([], None)


def test_a_preference_accuracy_falling_two_rounds_in_a_row_raises_an_alert():
    assert preference_alerts([0.6, 0.7, 0.75]) == []
    assert preference_alerts([0.8, None, 0.6]) == []

    [alert] = preference_alerts([0.5, 0.8, 0.7, 0.6])

    assert alert.kind == "preference-falling" and "0.800 -> 0.700 -> 0.600" in alert.message


def test_a_dp_release_clips_margins_to_their_range_and_keeps_their_sign(tmp_path):
    node = NodeConfig(
        node=NodeSettings(name="bank", state_dir=tmp_path / "state"),
        model=ModelConfig(),
        data=DataConfig(train=tmp_path / "t.jsonl", eval=tmp_path / "e.jsonl"),
        # Little noise (and a cap it fits under): the released sums are near the true ones.
        privacy=PrivacySettings(
            target_epsilon=1000.0,
            release_metrics="dp",
            metric_margin_bound=2.0,
            metric_noise_multiplier=0.05,
        ),
    )
    margins_a = [-0.5] * 40
    margins_b = [1.0] * 39 + [50.0]  # the outlier counts as 2.0, the bound
    ledger = NodeLedger(tmp_path / "state", node="bank")

    content = dp_scores_content(
        node,
        {"reward-margin": {"a": margins_a, "b": margins_b}},
        identity=ConfigRecord({"name": "bank"}),
        ledger=ledger,
        held_out_fingerprint="sha256:" + "1" * 64,
        base_model_fingerprint="sha256:" + "2" * 64,
        test_id="ab-1",
    )

    scores = content.metric_records["scores"]
    noise = scores["reward-margin/noise-sd"]
    assert noise == pytest.approx(0.05 * np.sqrt(4) * 4.0)  # sensitivity sqrt(4), width 4
    assert scores["reward-margin/sum_a"] == pytest.approx(-20.0, abs=6 * noise + 2)
    assert scores["reward-margin/sum_b"] == pytest.approx(41.0, abs=6 * noise + 2)
    [entry] = ledger.entries()
    assert entry.kind == "metric_release"
    ledger.close()
