"""Demo prompts with checkable answers for GRPO, one kind per demo domain.

- hospital: a triage level (1 to 4) that follows from stated findings under a stated rule
  (oxygen saturation, blood pressure, heart rate, temperature, pain score);
- bank: a month's fee in dollars that follows from an account's stated terms (a monthly fee
  waived above a balance, free transfers then a price per transfer, an overdraft charge).

Each row asks for ``<think>…</think><answer>…</answer>``; the answer is computed from the
row's own figures, so the rewards check it exactly (the level) or numerically (the fee,
within a cent). Figures, rules and wording vary with the seed; deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.common.errors import AlreadyExistsError
from fedtune.demo.data import DOMAINS, DemoDataError

FORMAT = "Reply as <think>your reasoning</think><answer>{what}</answer>."
# The rewards each domain's answers are checked with (training.grpo_rewards).
REWARDS = {"hospital": ["answer_exact", "format"], "bank": ["answer_numeric", "format"]}
NUMERIC_TOLERANCE = 0.01

_TRIAGE_SYSTEMS = (
    "You are a triage nurse. Apply the rule exactly.",
    "You assign emergency department triage levels from the findings given.",
    "You are a careful triage assistant.",
)
_BANK_SYSTEMS = (
    "You are a bank's fee assistant. Compute fees from the account terms exactly.",
    "You answer questions about account fees from the stated terms.",
    "You are a careful banking assistant.",
)


def _triage(rng: random.Random) -> dict[str, Any]:
    spo2 = rng.randint(82, 89) if rng.random() < 0.15 else rng.randint(90, 100)
    systolic = rng.randint(70, 89) if rng.random() < 0.15 else rng.randint(90, 160)
    heart = rng.randint(121, 160) if rng.random() < 0.2 else rng.randint(55, 120)
    hot = rng.random() < 0.2
    temperature = round(rng.uniform(39.5, 41.0) if hot else rng.uniform(36.0, 39.4), 1)
    pain = rng.randint(0, 10)
    if spo2 < 90 or systolic < 90:
        level = 1
    elif heart > 120 or temperature >= 39.5:
        level = 2
    elif pain >= 7:
        level = 3
    else:
        level = 4
    findings = [
        f"oxygen saturation {spo2}%",
        f"blood pressure {systolic}/{rng.randint(50, 95)}",
        f"heart rate {heart}",
        f"temperature {temperature} C",
        f"pain {pain}/10",
    ]
    rng.shuffle(findings)
    age = rng.randint(18, 90)
    complaint = rng.choice(
        ["chest pain", "a fall", "shortness of breath", "abdominal pain", "a headache", "fever"]
    )
    question = rng.choice(
        [
            "Rule: level 1 if oxygen saturation below 90% or systolic pressure below 90; "
            "else level 2 if heart rate above 120 or temperature 39.5 C or more; else level 3 "
            "if pain 7/10 or more; else level 4.\nPatient, {age}, with {complaint}: {findings}."
            "\nWhich triage level?",
            "Patient aged {age} arrives with {complaint}. Findings: {findings}.\nTriage rule: "
            "level 1 when saturation < 90% or systolic < 90; level 2 when heart rate > 120 or "
            "temperature >= 39.5 C; level 3 when pain >= 7/10; otherwise level 4.\nWhat level?",
        ]
    ).format(age=age, complaint=complaint, findings=", ".join(findings))
    reasons = {
        1: f"Saturation {spo2}% and systolic {systolic}: one is below 90, so level 1.",
        2: f"Saturation {spo2}% and systolic {systolic} are not below 90; heart rate {heart} "
        f"and temperature {temperature} C meet the level 2 rule.",
        3: f"No level 1 or 2 finding; pain {pain}/10 is 7 or more, so level 3.",
        4: f"No level 1 or 2 finding and pain {pain}/10 is below 7, so level 4.",
    }
    return {
        "system": rng.choice(_TRIAGE_SYSTEMS),
        "prompt": f"{question}\n{FORMAT.format(what='the level number')}",
        "answer": str(level),
        "reasoning": reasons[level],
    }


def _fee(rng: random.Random) -> dict[str, Any]:
    monthly = rng.choice([5, 8, 10, 12, 15])
    waiver = rng.choice([500, 1000, 1500, 2500])
    free = rng.choice([2, 3, 5])
    per_transfer = rng.choice([0.5, 1.0, 1.5, 2.0, 2.5])
    overdraft = rng.choice([0, 0, 15, 25])
    balance = rng.choice([rng.randint(50, waiver - 1), rng.randint(waiver, waiver * 3)])
    transfers = rng.randint(0, free + 6)
    overdrafts = rng.randint(1, 2) if overdraft and rng.random() < 0.5 else 0
    fee = (
        (0 if balance >= waiver else monthly)
        + max(transfers - free, 0) * per_transfer
        + overdrafts * overdraft
    )
    terms = [
        f"monthly fee ${monthly}, waived if the balance stays at or above ${waiver}",
        f"the first {free} transfers each month are free, then ${per_transfer:.2f} per transfer",
    ]
    if overdraft:
        terms.append(f"${overdraft} per overdraft")
    month = f"lowest balance ${balance}, {transfers} transfers"
    if overdraft:
        month += f", {overdrafts} overdraft{'s' if overdrafts != 1 else ''}"
    question = rng.choice(
        [
            "Account terms: {terms}.\nThis month: {month}.\nWhat is the total fee this month?",
            "My account's terms are: {terms}. This month I had: {month}. How much do I pay in "
            "fees?",
        ]
    ).format(terms="; ".join(terms), month=month)
    charged = max(transfers - free, 0)
    reasoning = (
        f"Balance ${balance} is {'at or above' if balance >= waiver else 'below'} ${waiver}: "
        f"monthly fee ${0 if balance >= waiver else monthly}. {transfers} transfers, {free} "
        f"free: {charged} x ${per_transfer:.2f} = ${charged * per_transfer:.2f}."
        + (f" {overdrafts} x ${overdraft} overdraft." if overdraft else "")
        + f" Total ${fee:.2f}."
    )
    return {
        "system": rng.choice(_BANK_SYSTEMS),
        "prompt": f"{question}\n{FORMAT.format(what='the fee in dollars, a number')}",
        "answer": f"{fee:.2f}",
        "reasoning": reasoning,
    }


def generate_verifiable_prompts(domain: str, count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` rows ``{"system", "prompt", "answer", "reasoning"}`` of ``domain`` (the
    ``reasoning``, a worked solution, is ignored by GRPO; :func:`worked_examples` uses it)."""
    if domain not in DOMAINS:
        raise DemoDataError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
    rng = random.Random(f"grpo-{domain}-{seed}")
    make = _triage if domain == "hospital" else _fee
    return [make(rng) for _ in range(count)]


def worked_examples(domain: str, count: int, *, seed: int) -> list[dict[str, Any]]:
    """Supervised rows ``{"system", "prompt", "reasoning", "response"}`` whose answer is
    ``<answer>…</answer>`` after the worked reasoning (rendered as ``<think>…</think>``): a
    cold start that teaches a small model the format before GRPO, as DeepSeek-R1 did. Made
    from another seed than a node's data: public examples, no node's privacy spent."""
    return [
        {
            "system": row["system"],
            "prompt": row["prompt"],
            "reasoning": row["reasoning"],
            "response": f"<answer>{row['answer']}</answer>",
        }
        for row in generate_verifiable_prompts(domain, count, seed=seed)
    ]


def demo_prompt_paths(out_dir: Path, domain: str) -> tuple[Path, Path]:
    folder = out_dir / domain
    return folder / "grpo_train.jsonl", folder / "grpo_held_out.jsonl"


def check_prompt_output(out_dir: Path, domains: Sequence[str]) -> None:
    """Refuse before writing anything if a file would be overwritten."""
    for domain in domains:
        if domain not in DOMAINS:
            raise DemoDataError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
        for path in demo_prompt_paths(out_dir, domain):
            if path.exists() or path.is_symlink():
                raise AlreadyExistsError(f"{path} already exists; data files are not overwritten")


def write_demo_prompts(
    out_dir: Path, *, domain: str, train: int = 800, held_out: int = 100, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``OUT/DOMAIN/grpo_train.jsonl`` and ``grpo_held_out.jsonl``; existing files
    are never overwritten."""
    check_prompt_output(out_dir, (domain,))
    paths = demo_prompt_paths(out_dir, domain)
    rows = [
        {key: value for key, value in row.items() if key != "reasoning"}
        for row in generate_verifiable_prompts(domain, train + held_out, seed=seed)
    ]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, part in zip(paths, (rows[:train], rows[train:]), strict=True):
        with path.open("x", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in part))
    return paths
