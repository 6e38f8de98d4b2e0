"""Which loader reads a node's files: conversations for SFT, preference pairs for DPO.

A training file holds one kind of row. ``fedtune node train`` reads it as its own
``training.method`` says; a federated node, whose run chooses the method, reads it as what it
holds (:func:`holds_preference_pairs`) and declines a round of the other method. A held-out
preference file is evaluated on its chosen answers (the language-model loss of the answers
people preferred), so evaluation and A/B tests work for both kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fedtune.client_node.data import (
    ChatDataset,
    DataError,
    Message,
    load_chat_dataset,
    load_conversations,
)
from fedtune.client_node.preference_data import (
    PreferenceDataset,
    holds_preference_pairs,
    load_chosen_dataset,
    load_preference_dataset,
    load_preference_pairs,
)
from fedtune.platform.model.fingerprint import file_fingerprint

Method = Literal["sft", "dpo"]


def load_training_data(
    path: Path,
    tokenizer: Any,
    *,
    method: Method | None,
    max_length: int,
    loss_on_thinking: bool = True,
) -> ChatDataset | PreferenceDataset:
    """``path`` read for ``method``, or (``None``) for what the file holds."""
    if method is None:
        method = "dpo" if holds_preference_pairs(path) else "sft"
    if method == "dpo":
        return load_preference_dataset(path, tokenizer, max_length=max_length)
    if holds_preference_pairs(path):
        raise DataError(
            f'{path}: holds preference pairs, which training.method = "sft" does not train on; '
            'set training.method = "dpo"'
        )
    return load_chat_dataset(
        path, tokenizer, max_length=max_length, loss_on_thinking=loss_on_thinking
    )


def method_of(data: ChatDataset | PreferenceDataset) -> Method:
    return "dpo" if isinstance(data, PreferenceDataset) else "sft"


def load_held_out(
    path: Path,
    tokenizer: Any,
    *,
    max_length: int,
    limit: int | None = None,
    loss_on_thinking: bool = True,
) -> ChatDataset:
    """Held-out conversations; from a preference file, its chosen answers."""
    if holds_preference_pairs(path):
        return load_chosen_dataset(path, tokenizer, max_length=max_length, limit=limit)
    return load_chat_dataset(
        path, tokenizer, max_length=max_length, limit=limit, loss_on_thinking=loss_on_thinking
    )


def load_held_out_pairs(
    path: Path, tokenizer: Any, *, max_length: int, limit: int | None = None
) -> PreferenceDataset | None:
    """Held-out preference pairs (for preference accuracy and reward margin), or None when
    the held-out file holds conversations."""
    if not holds_preference_pairs(path):
        return None
    return load_preference_dataset(path, tokenizer, max_length=max_length, limit=limit)


def held_out_conversations(path: Path) -> list[list[Message]]:
    """Held-out conversations as rows: from a preference file, each prompt with its chosen
    answer (what A/B tests score)."""
    if holds_preference_pairs(path):
        return [pair.conversation(pair.chosen) for pair in load_preference_pairs(path)]
    return load_conversations(path)


def budget_group_fingerprints(paths: Sequence[Path]) -> list[str]:
    """The fingerprints of ``data.shares_budget_with``'s files (what the ledger knows them
    by); a missing file is an error, not a smaller group."""
    fingerprints = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: data.shares_budget_with names a file that is not there")
        fingerprints.append(file_fingerprint(path))
    return fingerprints
