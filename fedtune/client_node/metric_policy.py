"""What a node's replies say about its data besides the update: ``privacy.release_metrics``.

- ``"plain"``: every figure as computed (losses, token counts, timings).
- ``"dp"``: a train reply carries only the update's weight (its example count, which FedAvg
  needs); an evaluate reply, the held-out loss and example count released through
  :func:`fedtune.privacy.metric_release.release_mean` and accounted in the node's ledger on
  the held-out data set, with the perplexity and noise scale derived from them (free: they
  are computed from the release). Past the cap, nothing.
- ``"none"``: the weight of a train reply only; an evaluate reply carries no figure.

A/B tests answer only with ``"plain"`` (see :mod:`fedtune.client_node.abtest_eval`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from fedtune.client_node.evaluation import HeldOutMetrics
from fedtune.platform.config import NodeConfig
from fedtune.platform.wire.messages import NUM_EXAMPLES
from fedtune.privacy.accounting import BudgetExhaustedError
from fedtune.privacy.ledger import Checkpoint, LedgerEntry
from fedtune.privacy.metric_release import release_mean
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
) -> tuple[dict[str, int | float], tuple[LedgerEntry, Checkpoint] | None]:
    """The evaluate reply's metrics under the node's policy, and under ``"dp"`` the signed
    ledger entry of the release (recorded in ``ledger`` before anything is released)."""
    policy = config.privacy.release_metrics
    if policy == "none":
        return {}, None
    if policy == "plain":
        return {
            NUM_EXAMPLES: result.examples,
            "held-out-loss": result.loss,
            "held-out-perplexity": result.perplexity,
            "held-out-tokens": result.tokens,
            "evaluate-seconds": result.seconds,
            "node-seconds": seconds,
        }, None
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
    metrics: dict[str, int | float] = {
        NUM_EXAMPLES: released.count,
        "held-out-loss": released.mean,
        "held-out-perplexity": math.exp(min(released.mean, 50.0)),
        "held-out-loss-noise": released.noise_std / released.count,
    }
    return metrics, (released.entry, released.checkpoint)
