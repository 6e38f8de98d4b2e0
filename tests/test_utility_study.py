"""benchmarks/dp_utility_study.py runs end to end (on a tiny model here: its figures mean
nothing, its shape does): every point is measured or written as not measured, ratios are
DP gain over non-private gain, and the plot is drawn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).parent.parent / "benchmarks" / "dp_utility_study.py"

pytestmark = pytest.mark.simulation


def run_study(tmp_path: Path, model: Path, *extra: str) -> dict:
    out = tmp_path / "study.json"
    subprocess.run(
        [
            sys.executable,
            str(STUDY),
            "--model",
            str(model),
            "--sizes",
            "40",
            "--nodes",
            "1",
            "2",
            "--per-node",
            "32",
            "--rounds",
            "1",
            "--epsilons",
            "8",
            "--held-out",
            "6",
            "--epochs",
            "1",
            "--physical-batch-size",
            "8",
            "--out",
            str(out),
            *extra,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return json.loads(out.read_text())


def test_the_study_measures_every_point_within_its_budget(tmp_path, tiny_model_dir):
    report = run_study(tmp_path, tiny_model_dir)

    assert [(p["examples"], p["target_epsilon"]) for p in report["data_size"]] == [
        (40, None),
        (40, 8.0),
    ]
    assert all(p["status"] == "measured" for p in report["data_size"] + report["consortium"])
    plain, private = report["data_size"]
    expected = private["gain"] / plain["gain"] if plain["gain"] > 0 else None
    assert private["ratio_to_non_private"] == pytest.approx(expected)
    two = next(p for p in report["consortium"] if p["nodes"] == 2 and p["target_epsilon"] == 8.0)
    assert "gain_over_one_node" in two and two["epsilon_per_node"] <= 8.0
    assert (tmp_path / "study.png").is_file()


def test_points_past_the_budget_are_not_measured_never_extrapolated(tmp_path, tiny_model_dir):
    report = run_study(tmp_path, tiny_model_dir, "--budget-minutes", "0")

    points = report["data_size"] + report["consortium"]
    assert points and all(p["status"] == "not measured" for p in points)
    assert not any("gain" in p for p in points)
