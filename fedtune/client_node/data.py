"""The node's local data: JSONL, CSV or Parquet files rendered with the model's chat template.

Two record forms are accepted (:mod:`fedtune.client_node.data_files` reads the files; the
suffix chooses the format)::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..." (optional), "reasoning": "..." (optional)}

Reasoning in the DeepSeek-R1 style is an assistant message that starts with
``<think>...</think>`` before the answer; ``reasoning`` in the prompt/response form becomes
exactly that. Only assistant tokens count in the loss, the thinking too unless
``loss_on_thinking`` is false. Problems are reported as ``FILE:ROW: what``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedtune.client_node.data_files import DataError, read_records

__all__ = ["DataError"]

IGNORE_INDEX = -100
_ROLES = {"system", "user", "assistant"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

Message = dict[str, str]


def load_conversations(path: Path) -> list[list[Message]]:
    """Parse a data file (JSONL, CSV or Parquet) into conversations; blank lines are skipped.
    Errors name the file and row, never a row's text (it may be private)."""
    conversations = [_conversation(record, where) for where, record in read_records(path)]
    if not conversations:
        raise DataError(f"{path}: the data set is empty (no examples)")
    return conversations


def _text(record: dict[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise DataError(f"{where}: missing field '{field}' (a string)")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, not {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def _optional_text(record: dict[str, Any], field: str, where: str) -> str | None:
    """An optional field: absent, null or blank count as not given."""
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(record, field, where)


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
            if message["role"] == "assistant" and not message["content"].strip():
                raise DataError(f"{where}: messages[{index}] is an empty assistant message")
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record or "response" in record:
        prompt = _text(record, "prompt", where)
        response = _text(record, "response", where)
        conversation: list[Message] = []
        system = _optional_text(record, "system", where)
        if system is not None:
            conversation.append({"role": "system", "content": system})
        conversation.append({"role": "user", "content": prompt})
        reasoning = _optional_text(record, "reasoning", where)
        if reasoning is not None:
            response = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{response}"
        conversation.append({"role": "assistant", "content": response})
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
    conversation: Sequence[Message],
    tokenizer: Any,
    *,
    max_length: int,
    loss_on_thinking: bool = True,
) -> TokenizedExample:
    """Render with the chat template and label only the assistant turns (their text and the
    end-of-turn marker the template puts after it), truncated to ``max_length`` tokens. With
    ``loss_on_thinking`` false, an assistant turn's ``<think>...</think>`` block is context,
    not target: only the answer after it is labelled.

    The work is bounded whatever the row: only the first ``max_chars(max_length)`` characters
    of the conversation are rendered and tokenized (:func:`bounded_conversation`)."""
    limit = max_chars(max_length)
    conversation = bounded_conversation(conversation, limit)
    text, spans = render_conversation(conversation, tokenizer)
    if not loss_on_thinking:
        spans = [_after_thinking(text, start, stop) for start, stop in spans]
    text = text[:limit]
    spans = [(min(start, limit), min(stop, limit)) for start, stop in spans]
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


def render_conversation(
    conversation: Sequence[Message], tokenizer: Any
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template renders it, with the character spans of the
    assistant turns to learn.

    Most templates render a conversation prefix by prefix: every assistant turn is learnt.
    Reasoning templates in the DeepSeek-R1 style do not: they drop the thinking of every
    assistant turn they render and open the generation prompt with ``<think>``. For those,
    as at inference, the history is what the template renders and only the final assistant
    turn is learnt, written after the generation prompt with its thinking and the end
    marker the template puts after an answer."""
    template = tokenizer.apply_chat_template
    text: str = template(list(conversation), tokenize=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prefix = template(list(conversation[:index]), tokenize=False, add_generation_prompt=True)
        upto = template(list(conversation[: index + 1]), tokenize=False)
        if not text.startswith(upto) or not upto.startswith(prefix):
            break
        spans.append((len(prefix), len(upto)))
    else:
        if all(_thinking_kept(message, text) for message in conversation):
            return text, spans
    return _render_final_turn(conversation, tokenizer)


def _thinking_kept(message: Message, text: str) -> bool:
    """Whether the thinking of an assistant ``message`` (if any) is in the rendered text."""
    thinking = _thinking(message)
    return thinking is None or thinking in text


def _thinking(message: Message) -> str | None:
    content = message["content"]
    if message["role"] != "assistant" or not content.lstrip().startswith(THINK_OPEN):
        return None
    if THINK_CLOSE not in content:
        return None  # cut by the length bound before the thinking ended
    return content.lstrip()[len(THINK_OPEN) :].split(THINK_CLOSE, 1)[0].strip() or None


def _render_final_turn(
    conversation: Sequence[Message], tokenizer: Any
) -> tuple[str, list[tuple[int, int]]]:
    if conversation[-1]["role"] != "assistant":
        raise DataError(
            "the tokenizer's chat template does not render conversations prefix by prefix, "
            "and the conversation does not end with an assistant turn to learn"
        )
    prefix: str = tokenizer.apply_chat_template(
        list(conversation[:-1]), tokenize=False, add_generation_prompt=True
    )
    content = conversation[-1]["content"]
    # The generation prompt may already open the thinking ("<think>\n"): do not repeat it.
    if content.startswith(THINK_OPEN):
        for size in range(min(len(content), len(THINK_OPEN) + 4), len(THINK_OPEN) - 1, -1):
            if prefix.endswith(content[:size]):
                content = content[size:]
                break
    completion = content + _end_marker(conversation, tokenizer)
    return prefix + completion, [(len(prefix), len(prefix) + len(completion))]


def _end_marker(conversation: Sequence[Message], tokenizer: Any) -> str:
    """What the template writes after a final answer (e.g. the end-of-sentence token)."""
    rendered: str = tokenizer.apply_chat_template(list(conversation), tokenize=False)
    answer = conversation[-1]["content"].rsplit(THINK_CLOSE, 1)[-1]
    at = rendered.rfind(answer) if answer else -1
    if at >= 0:
        return rendered[at + len(answer) :]
    return str(getattr(tokenizer, "eos_token", None) or "")


def _after_thinking(text: str, start: int, stop: int) -> tuple[int, int]:
    """The part of the span ``text[start:stop]`` after its ``</think>`` and the blank space
    that follows (the whole span when it holds no thinking)."""
    close = text.find(THINK_CLOSE, start, stop)
    if close < 0:
        return start, stop
    answer = close + len(THINK_CLOSE)
    while answer < stop and text[answer].isspace():
        answer += 1
    return answer, stop


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
    path: Path,
    tokenizer: Any,
    *,
    max_length: int,
    limit: int | None = None,
    loss_on_thinking: bool = True,
) -> ChatDataset:
    """Load, render and tokenize a data file. Examples whose assistant part falls wholly
    beyond ``max_length`` teach nothing and are left out (counted in ``dropped``)."""
    conversations = load_conversations(path)
    if limit is not None:
        conversations = conversations[:limit]
    examples = [
        tokenize_conversation(
            c, tokenizer, max_length=max_length, loss_on_thinking=loss_on_thinking
        )
        for c in conversations
    ]
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
