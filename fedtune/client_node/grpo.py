"""Group relative policy optimisation (Shao et al. 2024, "DeepSeekMath", section 4.1; used for
DeepSeek-R1) on a LoRA adapter, one loss per prompt.

For each prompt the current policy samples a group of G completions; the rewards
(:mod:`fedtune.client_node.rewards`) score them against the prompt's answer; each
completion's advantage is its reward's distance from its group's mean in units of the
group's standard deviation (a group whose rewards are all equal teaches nothing: advantage 0,
never NaN). The loss is the clipped-ratio objective per completion token plus ``beta`` times
the k3 estimate of the KL divergence to the reference, the base model with the adapter
disabled (no second copy of the weights), averaged over each completion's tokens and then over
the group. One policy update per sampling (the paper's mu = 1): the "old" policy is the
current one, detached, so the ratio is 1 in value and the clip guards the gradient's form.

Under DP-SGD the privacy unit is one prompt with its answer: everything a prompt's loss
depends on (its completions, rewards and advantages) comes from that prompt alone. The G
policy passes run over the batch of prompts in the same row order (pass g holds completion g
of every prompt), and Opacus adds each pass's per-row gradients into the same per-row slot, so
one backward leaves in row i the gradient of prompt i's loss (as for DPO's two passes;
``tests/test_grpo.py`` checks it against per-prompt autograd).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from fedtune.client_node.data import IGNORE_INDEX, Batch
from fedtune.client_node.dpo import _adapter_disabled
from fedtune.client_node.losses import labelled_token_losses
from fedtune.client_node.prompt_data import PromptDataset, make_prompt_collate
from fedtune.client_node.rewards import RewardScorer, format_reward
from fedtune.platform.config import GRPO_DEFAULTS


@dataclass(frozen=True)
class GRPOSettings:
    """The objective's knobs (``training.grpo_*``; the defaults are the config's)."""

    group_size: int = GRPO_DEFAULTS["grpo_group_size"]
    max_completion_tokens: int = GRPO_DEFAULTS["grpo_max_completion_tokens"]
    temperature: float = GRPO_DEFAULTS["grpo_temperature"]
    beta: float = GRPO_DEFAULTS["grpo_beta"]
    clip_ratio: float = GRPO_DEFAULTS["grpo_clip_ratio"]


@dataclass
class GRPOStats:
    """What a round's GRPO steps saw (the round's health figures) and where the time went."""

    completions: int = 0
    reward_sum: float = 0.0
    format_hits: int = 0
    completion_tokens: int = 0
    failures: list[str] = field(default_factory=list)  # the rewards' (RewardScorer.failures)
    kl_sum: float = 0.0
    kl_tokens: int = 0
    # Every token the round's GRPO steps processed, padding excluded: sampling (each of the
    # G copies of a prompt, then each completion's tokens), the reference passes and the
    # policy passes (G rows of prompt + completion each). About 3 G (prompt + completion)
    # per sampled prompt: what the round's cost report counts as its training tokens.
    tokens: int = 0
    # Sampling and scoring; the rest of a round's step time is the update (passes, backward,
    # clipping, noise, optimizer step).
    seconds: dict[str, float] = field(default_factory=lambda: {"generation": 0.0, "reward": 0.0})

    def summary(self) -> dict[str, float | None]:
        """Mean reward, format-reward share, mean completion length (tokens) and mean KL per
        token to the reference; None when nothing was sampled (every batch empty)."""
        n = self.completions
        return {
            "mean_reward": self.reward_sum / n if n else None,
            "format_share": self.format_hits / n if n else None,
            "completion_tokens": self.completion_tokens / n if n else None,
            "kl": self.kl_sum / self.kl_tokens if self.kl_tokens else None,
        }


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``(r - mean) / std`` within each group (row) of ``rewards [prompts, G]``; a group with
    no spread gets 0 everywhere (not NaN): no completion beat another."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    spread = std > 1e-6
    return torch.where(spread, (rewards - mean) / torch.where(spread, std, 1.0), 0.0)


def clipped_token_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_ratio: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss ``-(min(rho A, clip(rho, 1-e, 1+e) A) - beta KL)`` with
    ``rho = exp(logp - old)`` and the k3 estimator ``KL = exp(ref - logp) - (ref - logp) - 1``
    (always >= 0); returns ``(loss, kl)`` per token."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    log_ratio = reference_logprobs - logprobs
    kl = torch.exp(log_ratio) - log_ratio - 1.0
    return -(surrogate - beta * kl), kl


def completion_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int
) -> Batch:
    """Right-padded ``prompt + completion`` rows whose labels are the completion's tokens."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor(prompt + completion, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def group_losses(
    model: nn.Module,
    prompts: list[list[int]],
    completions: list[list[list[int]]],
    advantages: torch.Tensor,
    *,
    settings: GRPOSettings,
    pad_token_id: int,
    device: torch.device,
    stats: GRPOStats | None = None,
) -> torch.Tensor:
    """Per-prompt GRPO losses (shape ``[prompts]``) for fixed completions
    (``completions[i][g]``) and advantages ``[prompts, G]``: the reference passes first (no
    gradient), then G policy passes over the prompts in the same row order."""
    groups = advantages.shape[1]
    batches = [
        completion_batch(prompts, [group[g] for group in completions], pad_token_id)
        for g in range(groups)
    ]
    with torch.no_grad(), _adapter_disabled(model):
        references = [-labelled_token_losses(model, batch, device)[0] for batch in batches]
    if stats is not None:  # the reference passes and the policy passes read these rows
        stats.tokens += 2 * sum(int(batch["attention_mask"].sum()) for batch in batches)
    advantages = advantages.to(device)
    total = torch.zeros(len(prompts), device=device)
    for g, batch in enumerate(batches):
        losses, rows, size = labelled_token_losses(model, batch, device)
        logprobs = -losses
        token_loss, kl = clipped_token_objective(
            logprobs,
            logprobs.detach(),
            references[g],
            advantages[rows, g].to(logprobs.dtype),
            clip_ratio=settings.clip_ratio,
            beta=settings.beta,
        )
        sums = torch.zeros(size, device=device, dtype=token_loss.dtype).index_add(
            0, rows, token_loss
        )
        counts = torch.bincount(rows, minlength=size).clamp(min=1)
        total = total + sums / counts / groups
        if stats is not None:
            stats.kl_sum += float(kl.detach().sum())
            stats.kl_tokens += int(kl.numel())
    return total


def sample_completions(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    settings: GRPOSettings,
    eos_token_ids: list[int],
    pad_token_id: int,
    device: torch.device,
    greedy: bool = False,
) -> list[list[list[int]]]:
    """G completions per left-padded prompt from the current policy (``[prompt][g]``
    token lists, each cut after its first end token, which it keeps). ``greedy`` takes one
    most likely completion per prompt instead (held-out evaluation)."""
    config = GenerationConfig(
        max_new_tokens=settings.max_completion_tokens,
        do_sample=not greedy,
        temperature=None if greedy else settings.temperature,
        top_k=None if greedy else 0,
        top_p=None if greedy else 1.0,
        num_return_sequences=1 if greedy else settings.group_size,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids,
    )
    was_training = model.training
    model.eval()  # no dropout while sampling; no_grad: Opacus' hooks record nothing
    try:
        with torch.no_grad():
            output = model.generate(  # type: ignore[operator]
                input_ids=prompt_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
    finally:
        model.train(was_training)
    generated = output[:, prompt_ids.shape[1] :].tolist()
    per_prompt = config.num_return_sequences or 1
    cut = [_until_end(tokens, set(eos_token_ids)) for tokens in generated]
    return [cut[i : i + per_prompt] for i in range(0, len(cut), per_prompt)]


def _until_end(tokens: list[int], ends: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in ends:
            return tokens[: index + 1]
    return tokens


def end_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the model's and the tokenizer's end tokens."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return sorted(ids)


def unpadded(prompt_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, attention_mask, strict=True)]


def grpo_objective(
    *,
    dataset: PromptDataset,
    tokenizer: Any,
    scorer: RewardScorer,
    settings: GRPOSettings,
    stats: GRPOStats,
) -> Callable[[nn.Module, dict[str, torch.Tensor], torch.device], torch.Tensor]:
    """The trainer's per-row loss for GRPO: sample, score, then :func:`group_losses`."""
    pad = int(tokenizer.pad_token_id)

    def losses(
        model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        started = time.perf_counter()
        groups = sample_completions(
            model,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            settings=settings,
            eos_token_ids=end_token_ids(model, tokenizer),
            pad_token_id=pad,
            device=device,
        )
        sampled = time.perf_counter()
        rows = [dataset.rows[int(i)] for i in batch["row"]]
        texts = [[tokenizer.decode(c, skip_special_tokens=True) for c in g] for g in groups]
        rewards = torch.tensor(
            [
                [scorer.score(text, row.answer, where=row.where) for text in group]
                for row, group in zip(rows, texts, strict=True)
            ],
            dtype=torch.float32,
        )
        stats.format_hits += sum(int(format_reward(t, "")) for group in texts for t in group)
        stats.completions += int(rewards.numel())
        stats.reward_sum += float(rewards.sum())
        completion_tokens = sum(len(c) for g in groups for c in g)
        stats.completion_tokens += completion_tokens
        # Sampling read each prompt once per completion (G rows), then the completions.
        stats.tokens += settings.group_size * int(batch["prompt_attention_mask"].sum())
        stats.tokens += completion_tokens
        scored = time.perf_counter()
        result = group_losses(
            model,
            unpadded(batch["prompt_input_ids"], batch["prompt_attention_mask"]),
            groups,
            group_advantages(rewards),
            settings=settings,
            pad_token_id=pad,
            device=device,
            stats=stats,
        )
        stats.seconds["generation"] += sampled - started
        stats.seconds["reward"] += scored - sampled
        return result

    return losses


def greedy_rewards(
    model: nn.Module,
    dataset: PromptDataset,
    *,
    tokenizer: Any,
    scorer: RewardScorer,
    settings: GRPOSettings,
    device: torch.device,
    rows: Sequence[int] | None = None,
    bounded: bool = False,
    batch_size: int = 8,
) -> list[tuple[float, str]]:
    """Per held-out prompt (``rows`` of ``dataset``, in that order; default all), the
    reward of its most likely completion and the completion's text. ``bounded`` counts each
    reward in [0, 1] (:meth:`RewardScorer.score`)."""
    pad = int(tokenizer.pad_token_id)
    collate = make_prompt_collate(pad)
    order = list(range(len(dataset))) if rows is None else list(rows)
    out: list[tuple[float, str]] = []
    for start in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[start : start + batch_size]])
        groups = sample_completions(
            model,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            settings=settings,
            eos_token_ids=end_token_ids(model, tokenizer),
            pad_token_id=pad,
            device=device,
            greedy=True,
        )
        for index, group in zip(batch["row"].tolist(), groups, strict=True):
            row = dataset.rows[index]
            text = tokenizer.decode(group[0], skip_special_tokens=True)
            out.append((scorer.score(text, row.answer, where=row.where, bounded=bounded), text))
    return out


def held_out_reward(
    model: nn.Module,
    dataset: PromptDataset,
    *,
    tokenizer: Any,
    scorer: RewardScorer,
    settings: GRPOSettings,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean reward (and format share) of the most likely completion per held-out prompt:
    the number GRPO should raise."""
    scored = greedy_rewards(
        model,
        dataset,
        tokenizer=tokenizer,
        scorer=scorer,
        settings=settings,
        device=device,
        batch_size=batch_size,
    )
    rewards = [reward for reward, _ in scored]
    formats = [format_reward(text, "") for _, text in scored]
    return {
        "mean_reward": sum(rewards) / len(rewards),
        "format_share": sum(formats) / len(formats),
        "prompts": float(len(rewards)),
    }
