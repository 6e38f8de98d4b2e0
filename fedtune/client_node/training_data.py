"""Which loader reads a node's files: conversations for SFT, preference pairs for DPO,
prompts with checkable answers for GRPO.

A training file holds one kind of row. ``fedtune node train`` reads it as its own
``training.method`` says; a federated node, whose run chooses the method, reads it as what it
holds (:func:`holds_preference_pairs`) and declines a round of the other method. A held-out
preference file is evaluated on its chosen answers (the language-model loss of the answers
people preferred), a held-out prompt file on its reference answers written as
``<answer>…</answer>``, so evaluation and A/B tests work for every kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fedtune.client_node.data import (
    IGNORE_INDEX,
    ChatDataset,
    DataError,
    Message,
    TokenizedExample,
    load_chat_dataset,
    load_conversations,
    tokenize_conversation,
)
from fedtune.client_node.preference_data import (
    PreferenceDataset,
    holds_preference_pairs,
    load_chosen_dataset,
    load_preference_dataset,
    load_preference_pairs,
)
from fedtune.client_node.preference_data import count_rows as _count_rows
from fedtune.client_node.prompt_data import (
    PROMPT_FORM,
    PromptDataset,
    PromptRow,
    holds_verifiable_prompts,
    load_prompt_dataset,
    load_prompt_rows,
)
from fedtune.platform.model.fingerprint import file_fingerprint

Method = Literal["sft", "dpo", "grpo"]
TrainingData = ChatDataset | PreferenceDataset | PromptDataset


def method_in(path: Path) -> Method:
    """The method a training file's rows are for."""
    if holds_preference_pairs(path):
        return "dpo"
    return "grpo" if holds_verifiable_prompts(path) else "sft"


def load_training_data(
    path: Path,
    tokenizer: Any,
    *,
    method: Method | None,
    max_length: int,
    loss_on_thinking: bool = True,
) -> TrainingData:
    """``path`` read for ``method``, or (``None``) for what the file holds."""
    if method is None:
        method = method_in(path)
    if method == "dpo":
        return load_preference_dataset(path, tokenizer, max_length=max_length)
    if method == "grpo":
        return load_prompt_dataset(path, tokenizer, max_length=max_length)
    if holds_verifiable_prompts(path):
        raise DataError(
            f'{path}: holds prompts with answers {PROMPT_FORM}, which training.method = "sft" '
            'does not train on; set training.method = "grpo"'
        )
    if holds_preference_pairs(path):
        raise DataError(
            f'{path}: holds preference pairs, which training.method = "sft" does not train on; '
            'set training.method = "dpo"'
        )
    return load_chat_dataset(
        path, tokenizer, max_length=max_length, loss_on_thinking=loss_on_thinking
    )


def method_of(data: TrainingData) -> Method:
    if isinstance(data, PromptDataset):
        return "grpo"
    return "dpo" if isinstance(data, PreferenceDataset) else "sft"


def answered(row: PromptRow) -> list[Message]:
    """A GRPO prompt with its reference answer as the assistant's turn, in the answer tags
    the rewards read: what held-out loss and A/B tests score on a prompt file."""
    return [*row.prompt, {"role": "assistant", "content": f"<answer>{row.answer}</answer>"}]


def load_held_out(
    path: Path,
    tokenizer: Any,
    *,
    max_length: int,
    limit: int | None = None,
    loss_on_thinking: bool = True,
) -> ChatDataset:
    """Held-out conversations; from a preference file, its chosen answers; from a prompt
    file, its reference answers (:func:`answered`)."""
    if holds_preference_pairs(path):
        return load_chosen_dataset(path, tokenizer, max_length=max_length, limit=limit)
    if holds_verifiable_prompts(path):
        rows = load_prompt_rows(path)[:limit]
        examples = [answered_example(row, tokenizer, max_length=max_length) for row in rows]
        kept = [e for e in examples if e is not None]
        if not kept:
            raise DataError(f"{path}: no reference answer falls within max_length={max_length}")
        return ChatDataset(kept, source=path, dropped=len(examples) - len(kept))
    return load_chat_dataset(
        path, tokenizer, max_length=max_length, limit=limit, loss_on_thinking=loss_on_thinking
    )


def answered_example(row: PromptRow, tokenizer: Any, *, max_length: int) -> TokenizedExample | None:
    """A GRPO prompt with its reference answer (:func:`answered`), tokenized for the
    held-out loss; None when no token of the answer falls within ``max_length``."""
    # The question and answer are at the end of a long prompt: keep the last tokens, as
    # GRPO's prompts do (prompt_data.render_prompt).
    example = _last_tokens(
        tokenize_conversation(answered(row), tokenizer, max_length=4 * max_length), max_length
    )
    return example if any(label != IGNORE_INDEX for label in example.labels) else None


def _last_tokens(example: TokenizedExample, max_length: int) -> TokenizedExample:
    return TokenizedExample(
        input_ids=example.input_ids[-max_length:], labels=example.labels[-max_length:]
    )


def load_held_out_pairs(
    path: Path, tokenizer: Any, *, max_length: int, limit: int | None = None
) -> PreferenceDataset | None:
    """Held-out preference pairs (for preference accuracy and reward margin), or None when
    the held-out file holds conversations."""
    if not holds_preference_pairs(path):
        return None
    return load_preference_dataset(path, tokenizer, max_length=max_length, limit=limit)


def load_held_out_prompts(
    path: Path, tokenizer: Any, *, max_length: int, limit: int | None = None
) -> PromptDataset | None:
    """Held-out GRPO prompts with their answers (for an A/B test's reward), or None when the
    held-out file holds no prompts with answers."""
    if not holds_verifiable_prompts(path):
        return None
    return load_prompt_dataset(path, tokenizer, max_length=max_length, limit=limit)


def held_out_conversations(path: Path) -> list[list[Message]]:
    """Held-out conversations as rows: from a preference file, each prompt with its chosen
    answer (what A/B tests score)."""
    if holds_preference_pairs(path):
        return [pair.conversation(pair.chosen) for pair in load_preference_pairs(path)]
    if holds_verifiable_prompts(path):
        return [answered(row) for row in load_prompt_rows(path)]
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


def count_rows(path: Path, *, method: str) -> int:
    """Training rows of ``path`` for ``method`` (conversations, pairs or prompts): the
    privacy units the planner sizes batches for."""
    if method == "grpo":
        return len(load_prompt_rows(path))
    return _count_rows(path, preference=method == "dpo")
