"""Scores of a generated answer against the reference answer, computed on the node."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits), as ROUGE's default tokenizer does."""
    return _WORD.findall(text.lower())


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): from the longest common subsequence of the two word sequences."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[-1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> float:
    """1.0 when the answers have the same words (case and punctuation aside), else 0.0."""
    return 1.0 if words(candidate) == words(reference) else 0.0
