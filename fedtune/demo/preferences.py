"""Demo preference pairs for DPO: each demo question with a better and a worse answer.

The pairs are made from the same records as the demo's supervised data (same domain and
seed: pair ``i`` asks example ``i``'s question, and its better answer is that example's), so
a node holding both files holds the same people twice: the case ``data.shares_budget_with``
is for. The worse answer has one flaw a reader can see, stated in the row's ``reason`` (which
training ignores): a wrong figure, an emergency sent to a routine appointment, a guessed
diagnosis, a vague non-answer, or (at the bank) a request for the card's PIN. Deterministic
for a given seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtune.common.errors import AlreadyExistsError
from fedtune.demo.data import DOMAINS, DemoDataError, generate_examples

Flaw = Callable[[str, random.Random], tuple[str, str] | None]

_LEVELS = ["emergency", "urgent", "same week", "routine"]
_TRIAGE = re.compile(r"Triage level: (emergency|urgent|same week)\. Please [^.]*\.( [^.]*\.)?")
# A figure, not part of a time of day (8:30) or of a longer number.
_NUMBER = re.compile(r"(?<![\d.:])\d+(?:\.\d+)?(?![\d.:])")


def _under_triage(answer: str, rng: random.Random) -> tuple[str, str] | None:
    match = _TRIAGE.search(answer)
    if match is None:
        return None
    level = match.group(1)
    lower = rng.choice(_LEVELS[_LEVELS.index(level) + 1 :])
    worse = answer.replace(
        match.group(0), f"Triage level: {lower}. Please book a routine appointment."
    )
    return worse, f"the worse answer triages a case of level {level} as {lower}"


def _wrong_figure(answer: str, rng: random.Random) -> tuple[str, str] | None:
    numbers = list(_NUMBER.finditer(answer))
    if not numbers:
        return None
    match = rng.choice(numbers)
    right = match.group(0)
    if "." in right:
        wrong = f"{float(right) * rng.choice([2, 3]):.{len(right.split('.')[1])}f}"
    else:
        wrong = str(int(right) * rng.choice([2, 3]) + rng.choice([1, 3, 7]))
    worse = answer[: match.start()] + wrong + answer[match.end() :]
    return worse, f"the worse answer says {wrong} where the right figure is {right}"


def _diagnosis(answer: str, rng: random.Random) -> tuple[str, str] | None:
    if "Triage level" not in answer:  # only a question about symptoms invites a guess
        return None
    worse = rng.choice(
        [
            "It is most likely nothing serious, probably a mild infection. Wait a few days.",
            "That sounds like stress to me. Rest and it will pass on its own.",
        ]
    )
    return worse, "the worse answer guesses a diagnosis and gives no next step"


def _vague(answer: str, rng: random.Random) -> tuple[str, str] | None:
    worse = rng.choice(
        [
            "Please contact us again later for more information.",
            "It depends. You can find more details on our website.",
        ]
    )
    return worse, "the worse answer gives none of the facts asked for"


def _asks_for_secrets(answer: str, rng: random.Random) -> tuple[str, str] | None:
    ask = rng.choice(
        [
            " To verify you, please reply with your card number and PIN.",
            " First, please tell me your online banking password.",
        ]
    )
    return answer + ask, "the worse answer asks for a card number, PIN or password"


# Each flaw with its weight; one is drawn among those that apply to the answer (a flaw
# returns None when it does not: no figure to get wrong, no triage level).
_FLAWS: dict[str, list[tuple[Flaw, float]]] = {
    "hospital": [(_under_triage, 3.0), (_wrong_figure, 3.0), (_diagnosis, 1.0), (_vague, 1.0)],
    "bank": [(_wrong_figure, 3.0), (_asks_for_secrets, 2.0), (_vague, 1.0)],
}


def generate_preference_pairs(domain: str, count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` preference pairs for ``domain``, made from :func:`generate_examples`'
    first ``count`` examples with the same seed."""
    if domain not in _FLAWS:
        raise DemoDataError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
    rng = random.Random(f"{domain}-{seed}-preferences")
    pairs = []
    for example in generate_examples(domain, count, seed=seed):
        system, user, assistant = example["messages"]
        applicable = [
            (made, weight)
            for flaw, weight in _FLAWS[domain]
            if (made := flaw(assistant["content"], rng)) is not None
        ]  # never empty: a vague answer always applies
        [(rejected, reason)] = rng.choices(
            [made for made, _ in applicable], weights=[weight for _, weight in applicable]
        )
        pairs.append(
            {
                "prompt": [system, user],
                "chosen": assistant["content"],
                "rejected": rejected,
                "reason": reason,
            }
        )
    return pairs


def demo_preference_paths(out_dir: Path, domain: str) -> tuple[Path, Path]:
    """Where :func:`write_demo_preferences` writes ``domain``'s train and held-out pairs."""
    folder = out_dir / domain
    return folder / "preferences_train.jsonl", folder / "preferences_held_out.jsonl"


def check_preference_output(
    out_dir: Path, domains: Sequence[str], *, train: int, held_out: int
) -> None:
    """Refuse, before anything is written, what :func:`check_demo_output` refuses for the
    preference files."""
    for name, number in (("train", train), ("held-out", held_out)):
        if number < 1:
            raise DemoDataError(f"the {name} pair count must be at least 1, not {number}")
    for domain in domains:
        if domain not in DOMAINS:
            raise DemoDataError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
        for path in demo_preference_paths(out_dir, domain):
            if path.exists() or path.is_symlink():
                raise AlreadyExistsError(f"{path} already exists; data files are not overwritten")


def write_demo_preferences(
    out_dir: Path, *, domain: str, train: int = 800, held_out: int = 100, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``OUT/DOMAIN/preferences_train.jsonl`` and ``preferences_held_out.jsonl`` from
    the same records as :func:`~fedtune.demo.data.write_demo_data` with the same counts and
    seed; existing files are never overwritten."""
    check_preference_output(out_dir, (domain,), train=train, held_out=held_out)
    paths = demo_preference_paths(out_dir, domain)
    pairs = generate_preference_pairs(domain, train + held_out, seed=seed)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, part in zip(paths, (pairs[:train], pairs[train:]), strict=True):
        with path.open("x", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(pair) + "\n" for pair in part))
    return paths
