"""Verifiable rewards for GRPO: rules that score a completion against a prompt's reference
answer, run on the node only (the answers never leave it).

Built in (``training.grpo_rewards`` names them; a completion's reward is their sum):

- ``answer_exact``: 1 when the text inside the completion's last ``<answer>…</answer>``
  equals the reference answer (case and surrounding blank space ignored), else 0;
- ``answer_numeric``: 1 when that text and the reference are numbers within
  ``training.grpo_numeric_tolerance`` of each other (``1,250.00`` and ``$1250`` read as 1250);
- ``format``: 1 when the whole completion is ``<think>…</think>`` then ``<answer>…</answer>``.

A node operator adds a reward of their own by installing a Python package that declares it
in the entry point group ``fedtune.rewards``::

    [project.entry-points."fedtune.rewards"]
    triage_distance = "my_rewards:triage_distance"   # f(completion: str, answer: str) -> float

and naming it (``triage_distance``) in ``training.grpo_rewards``. A reward that raises, or
returns something other than a finite number, scores 0 for that completion; the node logs
the reward's name and the prompt's row (``FILE:LINE``), never the row's text, and trains on.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from fedtune.common.errors import FedtuneError

ENTRY_POINT_GROUP = "fedtune.rewards"
RewardFunction = Callable[[str, str], float]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*", re.DOTALL)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
logger = logging.getLogger(__name__)


class RewardError(FedtuneError, ValueError):
    """A reward named in the configuration cannot be found or loaded."""


def final_answer(completion: str) -> str | None:
    """The text inside the completion's last ``<answer>…</answer>``, stripped; None if none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def answer_exact(completion: str, answer: str) -> float:
    """1.0 when the final answer is the reference (case and blank space ignored)."""
    given = final_answer(completion)
    return float(given is not None and given.casefold() == answer.strip().casefold())


def parse_number(text: str) -> float | None:
    """The one number in ``text`` (thousands separators and a currency sign allowed)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[0]) if len(found) == 1 else None


def answer_numeric(tolerance: float) -> RewardFunction:
    """A reward of 1.0 when the final answer is a number within ``tolerance`` of the
    reference's number."""

    def reward(completion: str, answer: str) -> float:
        given = final_answer(completion)
        expected = parse_number(answer)
        value = parse_number(given) if given is not None else None
        if value is None or expected is None:
            return 0.0
        return float(abs(value - expected) <= tolerance + 1e-12 * abs(expected))

    reward.__name__ = "answer_numeric"
    return reward


def format_reward(completion: str, answer: str) -> float:
    """1.0 when the completion is ``<think>…</think><answer>…</answer>`` and nothing else."""
    del answer
    return float(_FORMAT.fullmatch(completion) is not None)


BUILT_IN = ("answer_exact", "answer_numeric", "format")


def load_reward(name: str, *, tolerance: float) -> RewardFunction:
    """The built-in reward ``name``, else the one installed under that name in the entry
    point group ``fedtune.rewards``."""
    if name == "answer_exact":
        return answer_exact
    if name == "answer_numeric":
        return answer_numeric(tolerance)
    if name == "format":
        return format_reward
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        raise RewardError(
            f"unknown reward {name!r}: built in are {', '.join(BUILT_IN)}; a reward of one's "
            f"own is installed as a Python entry point in the group {ENTRY_POINT_GROUP!r}"
        )
    target = next(iter(found))
    try:
        function = target.load()
    except Exception as exc:  # an operator's package: say which one failed to import
        raise RewardError(
            f"reward {name!r} ({target.value}) could not be loaded: {type(exc).__name__}: {exc}"
        ) from None
    if not callable(function):
        raise RewardError(f"reward {name!r} ({target.value}) is not a function")
    return function


@dataclass
class RewardScorer:
    """The configured rewards, summed; records the failures of each call (by reward name
    and row) instead of raising, so one bad row or reward does not stop a node's round."""

    names: tuple[str, ...]
    functions: tuple[RewardFunction, ...]
    failures: list[str] = field(default_factory=list)

    def score(self, completion: str, answer: str, *, where: str, bounded: bool = False) -> float:
        """The rewards' sum. ``bounded`` counts each reward in [0, 1] (the built-ins are 0 or
        1 already), so the sum lies in [0, :attr:`top`]: an A/B test's per-prompt score,
        whose range the coordinator checks and a DP release clips to."""
        total = 0.0
        for name, function in zip(self.names, self.functions, strict=True):
            value = self._one(name, function, completion, answer, where)
            total += min(max(value, 0.0), 1.0) if bounded else value
        return total

    @property
    def top(self) -> float:
        """The most a bounded score can be: one per reward."""
        return float(len(self.names))

    def _one(
        self, name: str, function: RewardFunction, completion: str, answer: str, where: str
    ) -> float:
        try:
            value = float(function(completion, answer))
        except Exception as exc:  # an operator's reward: any failure is its own, not the node's
            return self._failed(f"reward {name!r} raised {type(exc).__name__} on {where}")
        if not math.isfinite(value):
            return self._failed(f"reward {name!r} returned a non-finite value on {where}")
        return value

    def _failed(self, message: str) -> float:
        # Named by reward and FILE:LINE only: the exception's text may quote the row.
        logger.warning("%s; scored 0 for this completion", message)
        self.failures.append(message)
        return 0.0


def build_scorer(names: Sequence[str], *, tolerance: float = 0.0) -> RewardScorer:
    """A scorer for ``training.grpo_rewards``; an unknown name is an error at once."""
    if not names:
        raise RewardError("training.grpo_rewards names no reward")
    return RewardScorer(
        names=tuple(names),
        functions=tuple(load_reward(name, tolerance=tolerance) for name in names),
    )
