"""Prompts with checkable answers for GRPO: JSONL rows of a prompt and its reference answer.

Two row forms are accepted::

    {"prompt": "...", "answer": "...", "system": "..." (optional)}
    {"prompt": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., user last],
     "answer": "..."}

Other fields are ignored. The prompt is rendered with the model's chat template and its
generation prompt; the model writes the completion, which the rewards
(:mod:`fedtune.client_node.rewards`) score against the answer. One row (a prompt with its
answer) is the privacy unit. Problems are reported as ``FILE:LINE: what``, never with a
row's text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedtune.client_node.data import DataError, Message, max_chars
from fedtune.client_node.data_files import first_jsonl_record, read_records
from fedtune.client_node.preference_data import prompt_messages

PROMPT_FORM = '{"prompt", "answer"}'


@dataclass(frozen=True)
class PromptRow:
    """A prompt (a user turn last), its reference answer, and where it is (``FILE:LINE``)."""

    prompt: list[Message]
    answer: str
    where: str


def holds_verifiable_prompts(path: Path) -> bool:
    """Whether the first row of the JSONL file ``path`` is a prompt with an ``answer`` (and
    no SFT ``response`` or preference answers); False for anything else."""
    record = first_jsonl_record(path)
    return (
        isinstance(record, dict)
        and "answer" in record
        and not {"response", "chosen", "rejected", "messages"} & set(record)
    )


def load_prompt_rows(path: Path) -> list[PromptRow]:
    """Parse a JSONL file of prompts with answers; blank lines are skipped."""
    if path.suffix.lower() not in {".jsonl", ".ndjson"}:
        raise DataError(f"{path}: GRPO prompts {PROMPT_FORM} come in JSONL files (.jsonl)")
    rows = [_row(record, where) for where, record in read_records(path)]
    if not rows:
        raise DataError(f"{path}: the data set is empty (no prompts)")
    return rows


def _row(record: Any, where: str) -> PromptRow:
    if not isinstance(record, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if "answer" not in record:
        raise DataError(
            f"{where}: missing field 'answer': training.method = \"grpo\" needs rows {PROMPT_FORM}"
        )
    if "prompt" not in record:
        raise DataError(f"{where}: missing field 'prompt' (a string or a list of messages)")
    answer = record["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise DataError(f"{where}: field 'answer' must be a string or a number")
    if not answer.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    return PromptRow(prompt=prompt_messages(record, where), answer=answer.strip(), where=where)


def render_prompt(prompt: list[Message], tokenizer: Any, *, max_length: int) -> list[int]:
    """The prompt's tokens as the chat template renders it with the generation prompt; the
    last ``max_length`` tokens (the question and the generation prompt are at the end)."""
    text: str = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text = text[-max_chars(max_length) :]
    ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[-max_length:]


class PromptDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Tokenized prompts and their answers; items are ``(prompt_ids, row)``: the row's index
    is how a batch finds its answers. One item is one privacy unit under DP-GRPO."""

    unit = "prompts"

    def __init__(self, rows: list[PromptRow], prompt_ids: list[list[int]], *, source: Path):
        self.rows = rows
        self.prompt_ids = prompt_ids
        self.source = source
        self.dropped = 0  # a prompt is cut from the left, never dropped

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.prompt_ids[index]), torch.tensor(index)


def load_prompt_dataset(
    path: Path, tokenizer: Any, *, max_length: int, limit: int | None = None
) -> PromptDataset:
    """Load and tokenize a prompt file (each prompt's last ``max_length`` tokens)."""
    rows = load_prompt_rows(path)[:limit]
    ids = [render_prompt(row.prompt, tokenizer, max_length=max_length) for row in rows]
    return PromptDataset(rows, ids, source=path)


def make_prompt_collate(
    pad_token_id: int,
) -> Callable[[list[tuple[torch.Tensor, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Left-pad prompts (generation continues each at its end): ``prompt_input_ids``,
    ``prompt_attention_mask`` and ``row`` (each prompt's index in the data set)."""

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {
                "prompt_input_ids": empty,
                "prompt_attention_mask": empty,
                "row": torch.zeros((0,), dtype=torch.long),
            }
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for index, (ids, _) in enumerate(items):
            input_ids[index, length - len(ids) :] = ids
            attention[index, length - len(ids) :] = 1
        rows = torch.stack([row for _, row in items]).long()
        return {"prompt_input_ids": input_ids, "prompt_attention_mask": attention, "row": rows}

    return collate
