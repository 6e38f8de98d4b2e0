"""What a node's replies say about its data besides the update: ``privacy.release_metrics``.

- ``"plain"``: every figure as computed (losses, token counts, timings; on held-out
  preference pairs, preference accuracy and mean reward margin too).
- ``"dp"``: a train reply carries only the update's weight (its example count, which FedAvg
  needs); an evaluate reply, the held-out loss and example count (not the preference
  figures, which have no DP release in a round's evaluation) released through
  :func:`fedtune.privacy.metric_release.release_mean` and accounted in the node's ledger on
  the held-out data set, with the perplexity and noise scale derived from them (free: they
  are computed from the release). Past the cap, nothing.
- ``"none"``: the weight of a train reply only; an evaluate reply carries no figure.

An A/B test is answered with scores (``"plain"``, :mod:`fedtune.client_node.abtest_eval`),
with paired statistics released under DP (``"dp"``, :func:`dp_scores_content`), or declined
(``"none"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtune.client_node.evaluation import HeldOutMetrics
from fedtune.client_node.preference_eval import PreferenceMetrics
from fedtune.platform.config import NodeConfig
from fedtune.platform.wire.messages import (
    ABTEST,
    EVALUATE_DEVICE_SECONDS,
    EVALUATE_TOKENS,
    HELD_OUT_PAIRS,
    LEDGER,
    NODE,
    NODE_SECONDS,
    NUM_EXAMPLES,
    PREFERENCE_ACCURACY,
    REWARD,
    REWARD_MARGIN,
    SCORES,
    ledger_record,
)
from fedtune.privacy.accounting import BudgetExhaustedError
from fedtune.privacy.ledger import Checkpoint, LedgerEntry
from fedtune.privacy.metric_release import release_mean, release_sums
from fedtune.privacy.node_ledger import NodeLedger

logger = logging.getLogger(__name__)

# What an evaluate reply under "dp" carries.
DP_EVALUATE_METRICS = (
    NUM_EXAMPLES,
    "held-out-loss",
    "held-out-perplexity",
    "held-out-loss-noise",
)


def train_metrics(config: NodeConfig, metrics: Mapping[str, int | float]) -> dict[str, int | float]:
    """The train reply's metrics under the node's policy."""
    if config.privacy.release_metrics == "plain":
        return dict(metrics)
    return {NUM_EXAMPLES: metrics[NUM_EXAMPLES]}


def evaluate_metrics(
    config: NodeConfig,
    result: HeldOutMetrics,
    *,
    seconds: float,
    ledger: NodeLedger,
    held_out_fingerprint: str,
    base_model_fingerprint: str,
    run_id: str,
    round_number: int,
    preferences: PreferenceMetrics | None = None,
) -> tuple[dict[str, int | float], tuple[LedgerEntry, Checkpoint] | None]:
    """The evaluate reply's metrics under the node's policy, and under ``"dp"`` the signed
    ledger entry of the release (recorded in ``ledger`` before anything is released).
    ``preferences`` (held-out preference pairs) are released under ``"plain"`` only."""
    policy = config.privacy.release_metrics
    if policy == "none":
        return {}, None
    if policy == "plain":
        extra = preferences or PreferenceMetrics(margins=())
        metrics: dict[str, int | float] = {
            NUM_EXAMPLES: result.examples,
            "held-out-loss": result.loss,
            "held-out-perplexity": result.perplexity,
            "held-out-tokens": result.tokens,
            "evaluate-seconds": result.seconds + extra.seconds,
            EVALUATE_TOKENS: result.tokens_read + extra.tokens_read,
            EVALUATE_DEVICE_SECONDS: result.device_seconds + extra.device_seconds,
            NODE_SECONDS: seconds,
        }
        if extra.pairs:
            metrics.update(preference_metrics(extra))
        return metrics, None
    privacy = config.privacy
    try:
        released = release_mean(
            result.example_losses,
            bound=privacy.metric_loss_bound,
            noise_multiplier=privacy.metric_noise_multiplier,
            ledger=ledger,
            data_fingerprint=held_out_fingerprint,
            base_model_fingerprint=base_model_fingerprint,
            run_id=run_id,
            round_number=round_number,
            cap=privacy.cap,
            delta=privacy.delta,
            accountant=privacy.accountant,
        )
    except BudgetExhaustedError as exc:
        logger.warning("held-out metrics not released: %s", exc)
        return {}, None
    metrics = {
        NUM_EXAMPLES: released.count,
        "held-out-loss": released.mean,
        "held-out-perplexity": math.exp(min(released.mean, 50.0)),
        "held-out-loss-noise": released.noise_std / released.count,
    }
    return metrics, (released.entry, released.checkpoint)


def preference_metrics(preferences: PreferenceMetrics) -> dict[str, int | float]:
    """What an evaluate reply says about the held-out preference pairs."""
    return {
        HELD_OUT_PAIRS: preferences.pairs,
        PREFERENCE_ACCURACY: preferences.accuracy,
        REWARD_MARGIN: preferences.mean_margin,
    }


def dp_scores_content(
    config: NodeConfig,
    scores: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    identity: ConfigRecord,
    ledger: NodeLedger,
    held_out_fingerprint: str,
    base_model_fingerprint: str,
    test_id: str,
) -> RecordDict:
    """An A/B test reply under ``"dp"``: per metric, the paired statistics ``n``, ``sum_a``,
    ``sum_b`` and ``sum_d2`` released in one Gaussian mechanism (each example's row: 1, and
    per metric a', b', (b' - a')^2 with each score clipped to the metric's range [low, high]
    and mapped to [0, 1] as (score - low) / (high - low); the range is [0, loss bound] for
    the loss, [-margin bound, margin bound] for the reward margin, [0, number of the node's
    training.grpo_rewards] for a held-out prompt's reward, [0, 1] for the other
    metrics), with the noise's standard deviation on each sum and the signed ledger entry
    of the release. :class:`~fedtune.privacy.accounting.BudgetExhaustedError` past the cap."""
    metrics = list(scores)
    ranges = {m: score_range(config, m) for m in metrics}
    examples = len(scores[metrics[0]]["a"]) if metrics else 0
    rows = []
    for index in range(examples):
        row = [1.0]
        for metric in metrics:
            a = _unit(scores[metric]["a"][index], ranges[metric])
            b = _unit(scores[metric]["b"][index], ranges[metric])
            row += [a, b, (b - a) ** 2]
        rows.append(row)
    privacy = config.privacy
    released = release_sums(
        rows,
        columns=1 + 3 * len(metrics),
        noise_multiplier=privacy.metric_noise_multiplier,
        ledger=ledger,
        data_fingerprint=held_out_fingerprint,
        base_model_fingerprint=base_model_fingerprint,
        run_id=test_id,
        round_number=0,
        cap=privacy.cap,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )
    sums = released.sums
    record: dict[str, int | float | list[int] | list[float]] = {}
    for position, metric in enumerate(metrics):
        low, high = ranges[metric]
        width = high - low
        sum_a, sum_b, sum_d2 = sums[1 + 3 * position : 4 + 3 * position]
        # Back to the metric's scale: the shift (n * low) is the same on both sides, so
        # b - a and its square need the width alone.
        record.update(
            {
                f"{metric}/n": sums[0],
                f"{metric}/sum_a": sum_a * width + sums[0] * low,
                f"{metric}/sum_b": sum_b * width + sums[0] * low,
                f"{metric}/sum_d2": sum_d2 * width * width,
                f"{metric}/noise-sd": released.noise_std * width,
            }
        )
    return RecordDict(
        {
            SCORES: MetricRecord(record),
            ABTEST: ConfigRecord(
                {"per-example": False, "examples": max(0, round(sums[0])), "dp": True}
            ),
            NODE: identity,
            LEDGER: ledger_record((released.entry, released.checkpoint)),
        }
    )


def score_range(config: NodeConfig, metric: str) -> tuple[float, float]:
    """The range an A/B metric's per-example score is clipped to before a DP release."""
    privacy = config.privacy
    if metric == "loss":
        return 0.0, privacy.metric_loss_bound
    if metric == REWARD_MARGIN:
        return -privacy.metric_margin_bound, privacy.metric_margin_bound
    if metric == REWARD:
        # Each of the node's rewards counts in [0, 1] (abtest_eval): the node's own range,
        # never wider than the coordinator's bound (MAX_GRPO_REWARDS, which the config keeps).
        return 0.0, float(len(config.training.grpo_rewards))
    return 0.0, 1.0


def _unit(value: float, bounds: tuple[float, float]) -> float:
    """``value`` clipped to ``bounds`` and mapped to [0, 1]; NaN counts as the top of the
    range (as a release clips it), an infinity as the end it points to."""
    low, high = bounds
    clipped = high if math.isnan(value) else min(max(float(value), low), high)
    return (clipped - low) / (high - low)
