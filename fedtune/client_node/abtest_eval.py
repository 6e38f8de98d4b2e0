"""A node's part of an A/B test: score two model versions on the same held-out examples.

Only scores leave the node: per example (a list per version and metric, in the same order)
or, when the node's policy says so, paired statistics from which the coordinator can still
run a paired t-test or McNemar's test. Never the text, the prompts or the generations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from peft import PeftModel
from torch.utils.data import DataLoader

from fedtune.client_node.data import (
    IGNORE_INDEX,
    ChatDataset,
    bounded_conversation,
    make_collate,
    max_chars,
    tokenize_conversation,
)
from fedtune.client_node.grpo import greedy_rewards
from fedtune.client_node.local_round import grpo_settings
from fedtune.client_node.losses import sequence_losses
from fedtune.client_node.preference_eval import evaluate_preferences
from fedtune.client_node.rewards import RewardScorer, build_scorer
from fedtune.client_node.text_metrics import exact_match, rouge_l_f1
from fedtune.client_node.training_data import (
    answered,
    answered_example,
    held_out_conversations,
)
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import load_adapter_arrays
from fedtune.platform.wire.messages import (
    ABTEST,
    NODE,
    PREFERENCE_ACCURACY,
    REWARD,
    REWARD_MARGIN,
    SCORES,
    SUMMARY_FIELDS,
    AbTestInstructions,
)

GENERATION_METRICS: Mapping[str, Callable[[str, str], float]] = {
    "rouge-l": rouge_l_f1,
    "exact-match": exact_match,
}
# Scored on held-out preference pairs (only a node whose held-out file holds them).
PREFERENCE_METRICS = (PREFERENCE_ACCURACY, REWARD_MARGIN)
# Scored on held-out GRPO prompts (only a node whose held-out file holds them): per prompt,
# the greedy completion's reward under the node's training.grpo_rewards, each reward counted
# in [0, 1], so a score lies in [0, number of rewards].
PROMPT_METRICS = (REWARD,)
KNOWN_METRICS = ("loss", *GENERATION_METRICS, *PREFERENCE_METRICS, *PROMPT_METRICS)


class MissingHeldOutDataError(ValueError):
    """A metric was asked of a node whose held-out file does not hold what it scores."""


class NoPreferencePairsError(MissingHeldOutDataError):
    """A preference metric was asked of a node whose held-out file holds no pairs."""


class NoHeldOutPromptsError(MissingHeldOutDataError):
    """The reward was asked of a node whose held-out file holds no GRPO prompts."""


def held_out_prompt_rows(runtime: Any, max_examples: int) -> list[int]:
    """The first ``max_examples`` held-out GRPO prompts whose reference answer keeps a token
    within the node's max length (their indices): the rows every metric scores on a prompt
    file, so one row is one prompt throughout (a DP release's sensitivity counts rows)."""
    prompts = runtime.held_out_prompts
    tokenizer = runtime.loaded.base.tokenizer
    max_length = runtime.config.data.max_length
    rows: list[int] = []
    for index, row in enumerate(prompts.rows):
        if answered_example(row, tokenizer, max_length=max_length) is not None:
            rows.append(index)
        if len(rows) == max_examples:
            break
    return rows


def held_out_examples(runtime: Any, max_examples: int) -> tuple[list[Any], ChatDataset]:
    """The first ``max_examples`` held-out conversations that keep an assistant token within
    the node's max length, and their tokenized form (the same examples for A and B). From
    a preference file: the chosen answers of the first held-out pairs, the same pairs (in
    the same order) that the preference metrics score, so one row is one pair throughout;
    from a prompt file, the reference answers of :func:`held_out_prompt_rows`."""
    config = runtime.config
    pairs = runtime.held_out_pairs
    prompts = getattr(runtime, "held_out_prompts", None)
    if prompts is not None:
        tokenizer, max_length = runtime.loaded.base.tokenizer, config.data.max_length
        rows = [prompts.rows[i] for i in held_out_prompt_rows(runtime, max_examples)]
        examples = [answered_example(row, tokenizer, max_length=max_length) for row in rows]
        return (
            [bounded_conversation(answered(row), max_chars(max_length)) for row in rows],
            ChatDataset([e for e in examples if e is not None], source=config.data.eval),
        )
    if pairs is not None:
        chosen = pairs.originals[:max_examples]
        return (
            [
                bounded_conversation(p.conversation(p.chosen), max_chars(config.data.max_length))
                for p in chosen
            ],
            ChatDataset([p.chosen for p in pairs.pairs[: len(chosen)]], source=config.data.eval),
        )
    kept, tokenized = [], []
    for conversation in held_out_conversations(config.data.eval):
        example = tokenize_conversation(
            conversation, runtime.loaded.base.tokenizer, max_length=config.data.max_length
        )
        if any(label != IGNORE_INDEX for label in example.labels):
            # Generation prompts too are bounded: a held-out row of any size costs little.
            kept.append(bounded_conversation(conversation, max_chars(config.data.max_length)))
            tokenized.append(example)
        if len(kept) == max_examples:
            break
    return kept, ChatDataset(tokenized, source=config.data.eval)


@torch.no_grad()
def _losses(
    model: torch.nn.Module, data: ChatDataset, *, pad_token_id: int, device: Any
) -> list[float]:
    loader = DataLoader(data, batch_size=8, collate_fn=make_collate(pad_token_id))
    out: list[float] = []
    for batch in loader:
        out += [float(v) for v in sequence_losses(model, batch, device)]
    return out


@torch.no_grad()
def _generations(
    model: torch.nn.Module,
    conversations: Sequence[Any],
    *,
    tokenizer: Any,
    device: Any,
    max_new_tokens: int,
) -> list[tuple[str, str]]:
    """(greedy answer, reference answer) for each conversation's last assistant turn."""
    pairs = []
    for conversation in conversations:
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(
            list(conversation[:last]),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        input_ids = prompt["input_ids"].to(device)
        generated = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=prompt["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=True)
        pairs.append((answer, conversation[last]["content"]))
    return pairs


def _version_model(
    runtime: Any,
    arrays: Mapping[str, np.ndarray] | None,
    lora: LoraSettings | None,
    other: LoraSettings | None,
) -> tuple[PeftModel, Any]:
    """The model for one version and the context to score it in (the adapter switched off
    for the base model)."""
    model = runtime.model_with(lora or other or LoraSettings())
    if arrays is None:
        return model, model.disable_adapter()
    load_adapter_arrays(model, arrays)
    return model, nullcontext()


def score_versions(
    runtime: Any,
    instructions: AbTestInstructions,
    arrays: Mapping[str, Mapping[str, np.ndarray] | None],
) -> dict[str, dict[str, list[float]]]:
    """``{metric: {"a": [...], "b": [...]}}`` on the same held-out examples, in order (the
    preference metrics on the first ``max_examples`` held-out pairs, the reward on the first
    ``max_examples`` held-out prompts)."""
    unknown = sorted(set(instructions.metrics) - set(KNOWN_METRICS))
    if unknown:
        raise ValueError(f"unknown A/B metrics {unknown}; known: {list(KNOWN_METRICS)}")
    preference = [m for m in instructions.metrics if m in PREFERENCE_METRICS]
    if preference and runtime.held_out_pairs is None:
        raise NoPreferencePairsError(
            f"node {runtime.config.node.name} holds no held-out preference pairs "
            f"(data.eval = {runtime.config.data.eval.name}): it cannot score {preference}"
        )
    scorer = _reward_scorer(runtime) if REWARD in instructions.metrics else None
    conversations, data = held_out_examples(runtime, instructions.max_examples)
    tokenizer = runtime.loaded.base.tokenizer
    device = runtime.loaded.base.device
    scores: dict[str, dict[str, list[float]]] = {m: {} for m in instructions.metrics}
    sides = {"a": instructions.lora_a, "b": instructions.lora_b}
    for side, lora in sides.items():
        other = sides["b" if side == "a" else "a"]
        model, context = _version_model(runtime, arrays[side], lora, other)
        model.eval()
        with context:
            if "loss" in scores:
                scores["loss"][side] = _losses(
                    model, data, pad_token_id=runtime.pad_token_id, device=device
                )
            generated = [m for m in instructions.metrics if m in GENERATION_METRICS]
            if generated:
                pairs = _generations(
                    model,
                    conversations,
                    tokenizer=tokenizer,
                    device=device,
                    max_new_tokens=instructions.max_new_tokens,
                )
                for metric in generated:
                    scores[metric][side] = [GENERATION_METRICS[metric](g, r) for g, r in pairs]
            if preference:
                result = evaluate_preferences(
                    model,
                    runtime.held_out_pairs,
                    beta=instructions.dpo_beta,
                    pad_token_id=runtime.pad_token_id,
                    device=device,
                    adapter=arrays[side] is not None,
                    limit=instructions.max_examples,
                )
                if PREFERENCE_ACCURACY in scores:
                    scores[PREFERENCE_ACCURACY][side] = list(result.preferred)
                if REWARD_MARGIN in scores:
                    scores[REWARD_MARGIN][side] = list(result.margins)
            if scorer is not None:
                scores[REWARD][side] = _rewards(runtime, model, scorer, instructions.max_examples)
    return scores


def _reward_scorer(runtime: Any) -> RewardScorer:
    """The node's rewards (``RewardError`` if one cannot be loaded); ``NoHeldOutPromptsError``
    when its held-out file holds no prompts with answers."""
    config = runtime.config
    if getattr(runtime, "held_out_prompts", None) is None:
        raise NoHeldOutPromptsError(
            f"node {config.node.name} holds no held-out GRPO prompts with answers "
            f"(data.eval = {config.data.eval.name}): it cannot score ['{REWARD}']"
        )
    training = config.training
    return build_scorer(training.grpo_rewards, tolerance=training.grpo_numeric_tolerance)


def _rewards(runtime: Any, model: Any, scorer: RewardScorer, max_examples: int) -> list[float]:
    """Per held-out prompt, its greedy completion's reward (each reward counted in [0, 1]),
    as ``fedtune node train`` reports the held-out reward, at the node's completion length."""
    scored = greedy_rewards(
        model,
        runtime.held_out_prompts,
        tokenizer=runtime.loaded.base.tokenizer,
        scorer=scorer,
        settings=grpo_settings(runtime.config.training),
        device=runtime.loaded.base.device,
        rows=held_out_prompt_rows(runtime, max_examples),
        bounded=True,
    )
    return [reward for reward, _ in scored]


def scores_content(
    scores: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    per_example: bool,
    identity: ConfigRecord,
) -> RecordDict:
    """The reply: per-example scores, or only paired statistics when ``per_example`` is off."""
    record: dict[str, Any] = {}
    for metric, sides in scores.items():
        a = np.asarray(sides["a"], dtype=np.float64)
        b = np.asarray(sides["b"], dtype=np.float64)
        if per_example:
            record[f"{metric}/a"] = a.tolist()
            record[f"{metric}/b"] = b.tolist()
            continue
        d = b - a
        values = {
            "n": len(a),
            "sum_a": float(a.sum()),
            "sum_b": float(b.sum()),
            "sum_d": float(d.sum()),
            "sum_d2": float((d * d).sum()),
            "b_only": int(((a < 0.5) & (b >= 0.5)).sum()),
            "a_only": int(((a >= 0.5) & (b < 0.5)).sum()),
        }
        record.update({f"{metric}/{name}": values[name] for name in SUMMARY_FIELDS})
    examples = max((len(sides["a"]) for sides in scores.values()), default=0)
    return RecordDict(
        {
            SCORES: MetricRecord(record),
            ABTEST: ConfigRecord({"per-example": per_example, "examples": examples}),
            NODE: identity,
        }
    )
