"""GRPO's verifiable rewards: crafted right, wrong and malformed completions; an operator's
own reward installed as a Python entry point; a reward that raises names itself and the row
and scores 0 instead of stopping the node."""

import importlib
import logging
import sys
import textwrap

import pytest

from fedtune.client_node.rewards import (
    ENTRY_POINT_GROUP,
    RewardError,
    answer_exact,
    answer_numeric,
    build_scorer,
    final_answer,
    format_reward,
)

RIGHT = "<think>Chest pain with low blood pressure.</think>\n<answer>Level 1</answer>"


def test_exact_answer_reads_the_last_answer_tag_ignoring_case_and_space():
    assert answer_exact(RIGHT, "level 1") == 1.0
    assert answer_exact("<answer>2</answer> then <answer> Level 1 </answer>", "Level 1") == 1.0
    assert answer_exact("<think>x</think><answer>Level 2</answer>", "Level 1") == 0.0
    assert answer_exact("Level 1", "Level 1") == 0.0  # no answer tag: not an answer
    assert answer_exact("<answer>Level 1", "Level 1") == 0.0  # tag never closed
    assert final_answer("<answer></answer>") == ""


def test_numeric_answer_is_right_within_the_tolerance_only():
    reward = answer_numeric(0.01)
    assert reward("<answer>$1,250.00</answer>", "1250") == 1.0
    assert reward("<answer>12.505</answer>", "12.50") == 1.0
    assert reward("<answer>12.52</answer>", "12.50") == 0.0
    assert reward("<answer>about 12 or 13</answer>", "12") == 0.0  # two numbers: no answer
    assert reward("<answer>twelve</answer>", "12") == 0.0
    assert reward("12", "12") == 0.0
    assert answer_numeric(0.0)("<answer>-3</answer>", "-3") == 1.0


def test_format_reward_wants_thinking_then_an_answer_and_nothing_else():
    assert format_reward(RIGHT, "") == 1.0
    assert format_reward("  <think>a\nb</think><answer>c</answer>\n", "") == 1.0
    assert format_reward("<answer>c</answer>", "") == 0.0
    assert format_reward("<answer>c</answer><think>a</think>", "") == 0.0
    assert format_reward("<think></think><answer>c</answer>", "") == 0.0
    assert format_reward(RIGHT + " and more", "") == 0.0


def test_the_scorer_sums_the_named_rewards():
    scorer = build_scorer(["answer_exact", "format"])
    assert scorer.score(RIGHT, "Level 1", where="f:1") == 2.0
    assert scorer.score("<answer>Level 1</answer>", "Level 1", where="f:1") == 1.0
    assert scorer.score("no idea", "Level 1", where="f:1") == 0.0


def test_an_unknown_reward_is_refused_with_the_built_in_names():
    with pytest.raises(RewardError, match=r"unknown reward 'nope'.*answer_exact.*fedtune\.rewards"):
        build_scorer(["nope"])


@pytest.fixture
def installed_rewards(tmp_path, monkeypatch):
    """A package with two rewards, installed as a distribution declares entry points (a
    dist-info folder with entry_points.txt on sys.path), as `pip install` leaves it."""
    (tmp_path / "site_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_bonus(completion, answer):
                return len(completion) / 100

            def broken(completion, answer):
                raise KeyError("private row text " + answer)

            def not_a_number(completion, answer):
                return float("nan")
            """
        )
    )
    info = tmp_path / "site_rewards-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: site-rewards\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nlength_bonus = site_rewards:length_bonus\n"
        "broken = site_rewards:broken\nnot_a_number = site_rewards:not_a_number\n"
        "missing = site_rewards_gone:reward\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("site_rewards", None)


def test_an_installed_entry_point_reward_is_found_by_name(installed_rewards):
    scorer = build_scorer(["length_bonus", "format"])
    assert scorer.score(RIGHT, "Level 1", where="f:1") == pytest.approx(len(RIGHT) / 100 + 1)


def test_an_entry_point_that_cannot_load_is_named(installed_rewards):
    with pytest.raises(RewardError, match="reward 'missing' \\(site_rewards_gone:reward\\)"):
        build_scorer(["missing"])


def test_a_reward_that_raises_names_itself_and_the_row_scores_zero_and_goes_on(
    installed_rewards, caplog
):
    scorer = build_scorer(["broken", "not_a_number", "format"])

    with caplog.at_level(logging.WARNING):
        value = scorer.score(RIGHT, "Level 1", where="train.jsonl:7")

    assert value == 1.0  # the format reward still counts
    assert scorer.failures == [
        "reward 'broken' raised KeyError on train.jsonl:7",
        "reward 'not_a_number' returned a non-finite value on train.jsonl:7",
    ]
    assert "train.jsonl:7" in caplog.text and "broken" in caplog.text
    assert "private row text" not in caplog.text  # the exception's text may quote the row
