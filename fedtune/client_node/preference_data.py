"""Preference data for DPO: JSONL rows of a prompt with a better and a worse answer.

Two row forms are accepted::

    {"prompt": "...", "chosen": "...", "rejected": "...", "system": "..." (optional)}
    {"prompt": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., user last],
     "chosen": "..." | [{"role": "assistant", "content": "..."}],
     "rejected": "..." | [{"role": "assistant", "content": "..."}]}

Other fields (a ``reason``, an id) are ignored. Each answer is rendered after the prompt with
the model's chat template; only the answer's tokens (and the end-of-turn marker) count.
Problems are reported as ``FILE:LINE: what``, never with a row's text (it may be private).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedtune.client_node.data import (
    IGNORE_INDEX,
    Batch,
    ChatDataset,
    DataError,
    Message,
    TokenizedExample,
    load_conversations,
    make_collate,
    tokenize_conversation,
)
from fedtune.client_node.data_files import first_jsonl_record
from fedtune.common.errors import unreadable

_ROLES = {"system", "user", "assistant"}
ANSWERS = ("chosen", "rejected")
PAIR_FORM = '{"prompt", "chosen", "rejected"}'


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (the conversation up to the answer, a user turn last) and two answers."""

    prompt: list[Message]
    chosen: str
    rejected: str

    def conversation(self, answer: str) -> list[Message]:
        return [*self.prompt, {"role": "assistant", "content": answer}]


def holds_preference_pairs(path: Path) -> bool:
    """Whether the first row of the JSONL file ``path`` is a preference pair (has
    ``chosen`` or ``rejected``); False for anything else, including an unreadable file (the
    loader that reads it then says what is wrong). Preference pairs come in JSONL only: a CSV
    or Parquet file is never read as one."""
    record = first_jsonl_record(path)
    return isinstance(record, dict) and any(key in record for key in ANSWERS)


def load_preference_pairs(path: Path) -> list[PreferencePair]:
    """Parse a JSONL preference file; blank lines are skipped."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    pairs: list[PreferencePair] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
                pairs.append(_pair(record, f"{path}:{number}"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise DataError(unreadable(path, exc)) from None
    if not pairs:
        raise DataError(f"{path}: the data set is empty (no preference pairs)")
    return pairs


def _pair(record: Any, where: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if not any(key in record for key in ANSWERS):
        raise DataError(
            f"{where}: not a preference pair (no 'chosen' or 'rejected'): "
            f'training.method = "dpo" needs rows {PAIR_FORM}'
        )
    if "prompt" not in record:
        raise DataError(f"{where}: missing field 'prompt' (a string or a list of messages)")
    prompt = prompt_messages(record, where)
    chosen, rejected = (_answer(record, field, where) for field in ANSWERS)
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def prompt_messages(record: dict[str, Any], where: str) -> list[Message]:
    """A row's ``prompt`` (with its optional ``system``) as messages, a user turn last; DPO's
    pairs and GRPO's prompts share this form."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: field 'prompt' is empty")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: field 'system' must be a string")
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of messages")
    messages = [_message(message, f"{where}: prompt[{i}]") for i, message in enumerate(prompt)]
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt's last message must be the user's")
    return messages


def _message(message: Any, where: str) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where} must be an object")
    for field in ("role", "content"):
        if not isinstance(message.get(field), str):
            raise DataError(f"{where} is missing field '{field}'")
    if message["role"] not in _ROLES:
        # Not quoted: the error may reach the coordinator, and row text may be private.
        raise DataError(f"{where} has a role other than {sorted(_ROLES)}")
    return {"role": message["role"], "content": message["content"]}


def _answer(record: dict[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise DataError(f"{where}: missing field '{field}' (a string or one assistant message)")
    value = record[field]
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{where}: field '{field}' must hold exactly one assistant message")
        message = _message(value[0], f"{where}: {field}[0]")
        if message["role"] != "assistant":
            raise DataError(f"{where}: {field}[0] must be an assistant message")
        value = message["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string or one assistant message")
    if not value:
        raise DataError(f"{where}: field '{field}' is empty")
    return value


@dataclass(frozen=True)
class TokenizedPair:
    chosen: TokenizedExample
    rejected: TokenizedExample


def _answers_kept(example: TokenizedExample) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels)


class PreferenceDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Tokenized preference pairs; items are ``(chosen_ids, chosen_labels, rejected_ids,
    rejected_labels)``. One item is one privacy unit under DP-DPO."""

    unit = "preference pairs"

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        *,
        source: Path,
        dropped: int = 0,
        originals: Sequence[PreferencePair] = (),
    ):
        self.pairs = list(pairs)
        self.source = source
        self.dropped = dropped  # pairs with an answer wholly beyond max_length
        # The pairs as read, in the same order (empty when not kept): an A/B test scores
        # the chosen answers of the same pairs, so that each row is one pair everywhere.
        self.originals = list(originals)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        return (
            torch.tensor(pair.chosen.input_ids),
            torch.tensor(pair.chosen.labels),
            torch.tensor(pair.rejected.input_ids),
            torch.tensor(pair.rejected.labels),
        )


def load_preference_dataset(
    path: Path, tokenizer: Any, *, max_length: int, limit: int | None = None
) -> PreferenceDataset:
    """Load, render and tokenize a preference file. A pair either of whose answers falls
    wholly beyond ``max_length`` is left out (counted in ``dropped``)."""
    pairs = load_preference_pairs(path)[:limit]
    tokenized = [
        TokenizedPair(
            chosen=tokenize_conversation(
                pair.conversation(pair.chosen), tokenizer, max_length=max_length
            ),
            rejected=tokenize_conversation(
                pair.conversation(pair.rejected), tokenizer, max_length=max_length
            ),
        )
        for pair in pairs
    ]
    kept = [
        (pair, tokens)
        for pair, tokens in zip(pairs, tokenized, strict=True)
        if _answers_kept(tokens.chosen) and _answers_kept(tokens.rejected)
    ]
    if not kept:
        raise DataError(
            f"{path}: no preference pair keeps both answers within max_length={max_length}"
        )
    return PreferenceDataset(
        [tokens for _, tokens in kept],
        source=path,
        dropped=len(tokenized) - len(kept),
        originals=[pair for pair, _ in kept],
    )


def load_chosen_dataset(
    path: Path, tokenizer: Any, *, max_length: int, limit: int | None = None
) -> ChatDataset:
    """The preferred answers of a preference file as conversations: a DPO node's held-out
    loss is its model's loss on the answers people preferred."""
    pairs = load_preference_pairs(path)[:limit]
    examples = [
        tokenize_conversation(pair.conversation(pair.chosen), tokenizer, max_length=max_length)
        for pair in pairs
    ]
    kept = [e for e in examples if _answers_kept(e)]
    if not kept:
        raise DataError(f"{path}: no chosen answer falls within max_length={max_length}")
    return ChatDataset(kept, source=path, dropped=len(examples) - len(kept))


def make_pair_collate(
    pad_token_id: int,
) -> Callable[[list[tuple[torch.Tensor, ...]]], dict[str, torch.Tensor]]:
    """Pad a list of pairs into one flat batch: ``chosen_input_ids``, ``chosen_labels``,
    ``chosen_attention_mask`` and the same for ``rejected_``; row ``i`` of each half is the
    same pair (the order Opacus' per-sample gradients rely on)."""
    collate = make_collate(pad_token_id)

    def collate_pairs(items: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        chosen = collate([(item[0], item[1]) for item in items])
        rejected = collate([(item[2], item[3]) for item in items])
        return {
            **{f"chosen_{key}": value for key, value in chosen.items()},
            **{f"rejected_{key}": value for key, value in rejected.items()},
        }

    return collate_pairs


def split_pair_batch(batch: dict[str, torch.Tensor]) -> tuple[Batch, Batch]:
    """``(chosen, rejected)`` halves of a batch made by :func:`make_pair_collate`."""
    halves = tuple(
        {
            key.removeprefix(f"{side}_"): value
            for key, value in batch.items()
            if key.startswith(f"{side}_")
        }
        for side in ANSWERS
    )
    return halves[0], halves[1]


def count_rows(path: Path, *, preference: bool) -> int:
    """Training rows of ``path`` (preference pairs or conversations), for the planner."""
    return len(load_preference_pairs(path) if preference else load_conversations(path))
