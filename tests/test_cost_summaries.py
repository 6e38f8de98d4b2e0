"""How the dashboard sums a run's cost figures per node and round: a figure a node did not
send stays absent (never a zero in its place), and what the coordinator refused is named."""

from __future__ import annotations

import pandas as pd

from fedtune.dashboard.summaries import cost_chart_frame, costs_per_node_round

COLUMNS = [
    "round",
    "phase",
    "node_name",
    "train_tokens",
    "evaluate_tokens",
    "train_device_seconds",
    "evaluate_device_seconds",
    "wall_seconds",
    "refused",
]


def frame(rows: list[tuple]) -> pd.DataFrame:
    costs = pd.DataFrame(rows, columns=COLUMNS)
    for name in COLUMNS[3:8]:
        costs[name] = costs[name].astype(float)
    return costs


def test_a_round_sums_a_nodes_train_and_evaluate_replies():
    costs = frame(
        [
            (1, "train", "hospital", 4000, 600, 3.0, 0.5, 5.0, None),
            (1, "evaluate", "hospital", None, 300, None, 0.25, 1.0, None),
        ]
    )

    (row,) = costs_per_node_round(costs).to_dict("records")

    assert row["tokens"] == 4900 and row["train_tokens"] == 4000
    assert row["evaluate_tokens"] == 900 and row["evaluate_device_seconds"] == 0.75
    assert row["wall_seconds"] == 6.0 and row["refused"] is None


def test_a_node_that_sent_no_costs_shows_none_not_zero():
    costs = frame(
        [
            (1, "train", "bank", None, None, None, None, None, None),  # release_metrics none
            (1, "train", "liar", None, 10, None, None, 2.0, "train-tokens -5: negative"),
        ]
    )

    per = costs_per_node_round(costs).set_index("node_name")

    assert per.loc["bank", ["tokens", "train_device_seconds", "wall_seconds"]].isna().all()
    assert per.loc["liar", "tokens"] == 10 and pd.isna(per.loc["liar", "train_tokens"])
    assert per.loc["liar", "refused"] == "train-tokens -5: negative"
    assert cost_chart_frame(per.reset_index()).empty  # no device time sent: nothing drawn
