"""The GRPO demo prompts: deterministic by seed, varied, and each answer follows from the
figures its prompt states (recomputed here from the prompt's text)."""

import re
from collections import Counter

import pytest

from fedtune.cli import main
from fedtune.client_node.prompt_data import load_prompt_rows
from fedtune.client_node.rewards import answer_numeric, build_scorer, format_reward
from fedtune.demo.verifiable import REWARDS, generate_verifiable_prompts


def level_from_text(prompt: str) -> str:
    figure = {
        name: float(re.search(pattern, prompt).group(1))
        for name, pattern in {
            "spo2": r"oxygen saturation (\d+)%",
            "systolic": r"blood pressure (\d+)/",
            "heart": r"heart rate (\d+)",
            "temperature": r"temperature ([\d.]+) C(?! or more)",
            "pain": r"pain (\d+)/10(?! or more)",
        }.items()
    }
    if figure["spo2"] < 90 or figure["systolic"] < 90:
        return "1"
    if figure["heart"] > 120 or figure["temperature"] >= 39.5:
        return "2"
    return "3" if figure["pain"] >= 7 else "4"


def fee_from_text(prompt: str) -> float:
    monthly, waiver = (
        float(x) for x in re.search(r"fee \$(\d+), waived .* \$(\d+);", prompt).groups()
    )
    free, price = re.search(r"first (\d+) transfers .* then \$([\d.]+) per", prompt).groups()
    balance = float(re.search(r"lowest balance \$(\d+)", prompt).group(1))
    transfers = int(re.search(r"(\d+) transfers[,.]", prompt).group(1))
    overdraft = re.search(r"\$(\d+) per overdraft", prompt)
    count = re.search(r"(\d+) overdrafts?", prompt)
    fee = (0 if balance >= waiver else monthly) + max(transfers - int(free), 0) * float(price)
    if overdraft:
        fee += float(overdraft.group(1)) * int(count.group(1))
    return fee


def test_each_triage_level_follows_from_the_stated_findings_and_all_levels_occur():
    rows = generate_verifiable_prompts("hospital", 300, seed=3)

    assert all(row["answer"] == level_from_text(row["prompt"]) for row in rows)
    assert all(count >= 30 for count in Counter(row["answer"] for row in rows).values())
    assert len(Counter(row["answer"] for row in rows)) == 4


def test_each_fee_follows_from_the_stated_terms_and_fees_vary():
    rows = generate_verifiable_prompts("bank", 300, seed=3)

    assert all(float(row["answer"]) == pytest.approx(fee_from_text(row["prompt"])) for row in rows)
    assert len({row["answer"] for row in rows}) > 20
    assert Counter(row["answer"] for row in rows).most_common(1)[0][1] < 60  # no answer dominates


def test_the_same_seed_gives_the_same_prompts_and_another_seed_others():
    for domain in ("hospital", "bank"):
        first = generate_verifiable_prompts(domain, 50, seed=1)
        assert first == generate_verifiable_prompts(domain, 50, seed=1)
        assert first != generate_verifiable_prompts(domain, 50, seed=2)
        assert len({row["prompt"] for row in first}) == 50


def test_a_right_completion_earns_the_domains_full_reward():
    for domain in ("hospital", "bank"):
        row = generate_verifiable_prompts(domain, 1)[0]
        scorer = build_scorer(REWARDS[domain], tolerance=0.01)
        right = f"<think>apply the terms</think><answer>{row['answer']}</answer>"
        assert scorer.score(right, row["answer"], where="x:1") == 2.0
        assert format_reward(right, "") == 1.0
    assert answer_numeric(0.01)("<answer>$12.004</answer>", "12.00") == 1.0


def test_fedtune_data_demo_writes_grpo_prompts_and_never_overwrites(tmp_path, capsys):
    assert (
        main(["data", "demo", "--out", str(tmp_path), "--train", "6", "--held-out", "2", "--grpo"])
        == 0
    )

    for domain in ("hospital", "bank"):
        assert len(load_prompt_rows(tmp_path / domain / "grpo_train.jsonl")) == 6
        assert len(load_prompt_rows(tmp_path / domain / "grpo_held_out.jsonl")) == 2
    assert "prompts" in capsys.readouterr().out
