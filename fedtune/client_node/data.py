"""The node's local data: JSONL files rendered with the model's chat template.

Two line forms are accepted::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..." (optional)}

Only assistant tokens count in the loss. Problems are reported as ``FILE:LINE: what``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedtune.common.errors import FedtuneError, unreadable

IGNORE_INDEX = -100
_ROLES = {"system", "user", "assistant"}

Message = dict[str, str]


class DataError(FedtuneError, ValueError):
    """A data file is missing, malformed, or too small for the configured training."""


def load_conversations(path: Path) -> list[list[Message]]:
    """Parse a JSONL data file into conversations; blank lines are skipped. Errors name the
    file and line, never a line's text (it may be private)."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    conversations: list[list[Message]] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
                conversations.append(_conversation(record, f"{path}:{number}"))
    except UnicodeDecodeError:
        # Decoding runs ahead of the lines: the line number would not be exact.
        raise DataError(f"{path}: not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise DataError(unreadable(path, exc)) from None
    if not conversations:
        raise DataError(f"{path}: the data set is empty (no examples)")
    return conversations


def _conversation(record: Any, where: str) -> list[Message]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{where}: messages[{index}] must be an object")
            for field in ("role", "content"):
                if not isinstance(message.get(field), str):
                    raise DataError(f"{where}: messages[{index}] is missing field '{field}'")
            if message["role"] not in _ROLES:
                # The role is not quoted: an error goes to the coordinator, and a row's
                # text (any of it) may be private.
                raise DataError(
                    f"{where}: messages[{index}] has a role other than {sorted(_ROLES)}"
                )
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record or "response" in record:
        for field in ("prompt", "response"):
            if not isinstance(record.get(field), str):
                raise DataError(f"{where}: missing field '{field}' (a string)")
        conversation: list[Message] = []
        if isinstance(record.get("system"), str):
            conversation.append({"role": "system", "content": record["system"]})
        conversation.append({"role": "user", "content": record["prompt"]})
        conversation.append({"role": "assistant", "content": record["response"]})
        return conversation
    raise DataError(f"{where}: missing field 'messages' (or 'prompt' and 'response')")


# A token of the tokenizers we meet covers a few characters, rarely more than a dozen; this
# many characters per token of max_length always hold the first max_length tokens, and bound
# the work one example can cause (one 50 MB line once took minutes and 15 GB).
CHARS_PER_TOKEN_BOUND = 32


def max_chars(max_length: int) -> int:
    """The characters of a conversation that can matter for its first ``max_length`` tokens."""
    return max_length * CHARS_PER_TOKEN_BOUND


def bounded_conversation(conversation: Sequence[Message], limit: int) -> list[Message]:
    """``conversation`` cut after ``limit`` characters of content: later messages dropped,
    the one that crosses it shortened. A chat template renders each message's content in
    order, so the first ``limit`` characters of the rendered text are the same as before."""
    kept: list[Message] = []
    total = 0
    for message in conversation:
        if total >= limit:
            break
        content = message["content"][: limit - total]
        kept.append({"role": message["role"], "content": content})
        total += len(content)
    return kept


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but assistant tokens


def tokenize_conversation(
    conversation: Sequence[Message], tokenizer: Any, *, max_length: int
) -> TokenizedExample:
    """Render with the chat template and label only the assistant turns (their text and the
    end-of-turn marker the template puts after it), truncated to ``max_length`` tokens.

    The work is bounded whatever the row: only the first ``max_chars(max_length)`` characters
    of the conversation are rendered and tokenized (:func:`bounded_conversation`)."""
    limit = max_chars(max_length)
    conversation = bounded_conversation(conversation, limit)
    text = tokenizer.apply_chat_template(list(conversation), tokenize=False)[:limit]
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(
            list(conversation[:index]), tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(list(conversation[: index + 1]), tokenize=False)
        if not text.startswith(upto[:limit]) or not upto.startswith(prefix):
            raise DataError(
                "the tokenizer's chat template does not render conversations prefix by prefix; "
                "assistant tokens cannot be located"
            )
        spans.append((min(len(prefix), limit), min(len(upto), limit)))
    encoded = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=False
    )
    input_ids: list[int] = list(encoded["input_ids"])[:max_length]
    offsets = encoded["offset_mapping"][:max_length]
    labels = [
        token
        if any(start <= begin and end <= stop for start, stop in spans) and end > begin
        else IGNORE_INDEX
        for token, (begin, end) in zip(input_ids, offsets, strict=True)
    ]
    return TokenizedExample(input_ids=input_ids, labels=labels)


class ChatDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Tokenized conversations; items are ``(input_ids, labels)`` of varying length."""

    def __init__(self, examples: Sequence[TokenizedExample], *, source: Path, dropped: int = 0):
        self.examples = list(examples)
        self.source = source
        self.dropped = dropped  # examples with no assistant token left after truncation

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        example = self.examples[index]
        return torch.tensor(example.input_ids), torch.tensor(example.labels)


def load_chat_dataset(
    path: Path, tokenizer: Any, *, max_length: int, limit: int | None = None
) -> ChatDataset:
    """Load, render and tokenize a JSONL file. Examples whose assistant part falls wholly
    beyond ``max_length`` teach nothing and are left out (counted in ``dropped``)."""
    conversations = load_conversations(path)
    if limit is not None:
        conversations = conversations[:limit]
    examples = [tokenize_conversation(c, tokenizer, max_length=max_length) for c in conversations]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not kept:
        raise DataError(
            f"{path}: no example keeps an assistant token within max_length={max_length}"
        )
    return ChatDataset(kept, source=path, dropped=len(examples) - len(kept))


Batch = dict[str, torch.Tensor]


def make_collate(pad_token_id: int) -> Callable[[list[tuple[torch.Tensor, torch.Tensor]]], Batch]:
    """Pad a list of ``(input_ids, labels)`` to the longest in the batch (right padding)."""

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        if not items:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {"input_ids": empty, "labels": empty, "attention_mask": empty}
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(labs)] = labs
            attention[row, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    return collate
