"""How the coordinator and the nodes agree on SecAgg+: the mask generator and a threshold that
is always a strict majority."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.server.workflow import SecAggPlusWorkflow

from fedtune.coordinator.deployment import StrictMajority
from fedtune.platform.wire.messages import ARRAYS, METRICS, NUM_EXAMPLES, arrays_to_record
from fedtune.platform.wire.packed_arrays import ArrayLayout
from fedtune.platform.wire.secagg_masks import GENERATOR_NAME
from fedtune.platform.wire.secure_messages import (
    MASK_GENERATOR_KEY,
    SecureTrain,
    mask_generator_problem,
    secure_reply_from_train_reply,
)


def test_the_threshold_is_a_strict_majority_of_every_round_size():
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=StrictMajority(0.6), max_weight=10.0
    )

    # Flower's own formula (secaggplus_workflow.setup_stage): round(threshold * shares)
    thresholds = {n: round(workflow.reconstruction_threshold * n) for n in range(2, 12)}

    assert all(threshold > n / 2 for n, threshold in thresholds.items())
    assert thresholds[4] == 3  # plain 0.6 of 4 rounds to 2: no majority
    assert thresholds[10] == 6  # above the majority, the fraction decides


def test_a_node_s_masked_reply_names_the_generator_the_coordinator_unmasks_with():
    sent = {"w": np.zeros(3, dtype=np.float32)}
    request = SecureTrain(
        RecordDict({ARRAYS: arrays_to_record(sent)}), ArrayLayout.of(sent), None, ""
    )
    reply = RecordDict(
        {
            ARRAYS: arrays_to_record({"w": np.ones(3, dtype=np.float32)}),
            METRICS: MetricRecord({NUM_EXAMPLES: 4}),
        }
    )

    content = secure_reply_from_train_reply(reply, request)
    metrics = content.config_records["fitres.metrics"]

    assert metrics[MASK_GENERATOR_KEY] == GENERATOR_NAME
    assert mask_generator_problem(metrics) is None


def test_a_reply_masked_with_stock_flower_masks_is_named_as_such():
    problem = mask_generator_problem(ConfigRecord({"fedtune-reply": b""}))

    assert problem is not None and "stock Flower" in problem and GENERATOR_NAME in problem
