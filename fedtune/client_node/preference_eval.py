"""Held-out preference evaluation: how far a model's implicit DPO reward prefers the answers
people chose. Only the figures leave this module.

The implicit reward of an answer ``y`` to a prompt ``x`` is ``beta * log(pi(y|x) /
pi_ref(y|x))`` (Rafailov et al. 2023, eq. 5), with the reference the base model (the adapter
disabled), as in training (:mod:`fedtune.client_node.dpo`). A pair's *margin* is the chosen
answer's reward minus the rejected one's; the pair counts as *preferred* when its margin is
above 0. The base model's rewards are 0 by definition (it is its own reference): its
accuracy is 0 and its margin 0, the floor a tuned adapter starts from (as TRL's
``rewards/accuracies`` at step 0). Between the base and a version, the margin's paired test
asks whether the version prefers the chosen answers on average.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fedtune.client_node.dpo import answer_logprobs, reference_logprobs
from fedtune.client_node.preference_data import (
    PreferenceDataset,
    make_pair_collate,
    split_pair_batch,
)
from fedtune.platform.model.devices import DeviceClock


@dataclass(frozen=True)
class PreferenceMetrics:
    """Per-pair margins of held-out pairs and what they sum up to."""

    margins: tuple[float, ...]  # beta * ((pi_c - ref_c) - (pi_r - ref_r)), per pair
    seconds: float = 0.0
    tokens_read: int = 0  # tokens the forward passes read (both answers, padding excluded)
    device_seconds: float = 0.0

    @property
    def pairs(self) -> int:
        return len(self.margins)

    @property
    def preferred(self) -> tuple[float, ...]:
        """1.0 for each pair whose implicit reward prefers the chosen answer, else 0.0."""
        return tuple(float(margin > 0) for margin in self.margins)

    @property
    def accuracy(self) -> float:
        return sum(self.preferred) / self.pairs if self.pairs else float("nan")

    @property
    def mean_margin(self) -> float:
        return sum(self.margins) / self.pairs if self.pairs else float("nan")


@torch.no_grad()
def evaluate_preferences(
    model: nn.Module,
    pairs: PreferenceDataset,
    *,
    beta: float,
    pad_token_id: int,
    device: torch.device,
    adapter: bool = True,
    limit: int | None = None,
    batch_size: int = 8,
) -> PreferenceMetrics:
    """The implicit-reward margins of ``model`` (a PEFT model) on the first ``limit`` pairs.
    ``adapter=False`` scores the base model, whose margins are 0 without a forward pass."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    started = time.perf_counter()
    count = len(pairs) if limit is None else min(limit, len(pairs))
    if not adapter:
        return PreferenceMetrics(margins=(0.0,) * count, seconds=time.perf_counter() - started)
    was_training = model.training
    model.eval()
    loader = DataLoader(
        Subset(pairs, range(count)),
        batch_size=batch_size,
        collate_fn=make_pair_collate(pad_token_id),
    )
    margins: list[float] = []
    tokens_read = 0
    clock = DeviceClock(device)
    try:
        with clock:
            for batch in loader:
                chosen, rejected = split_pair_batch(batch)
                tokens_read += 2 * int(
                    chosen["attention_mask"].sum() + rejected["attention_mask"].sum()
                )
                policy = answer_logprobs(model, chosen, device) - answer_logprobs(
                    model, rejected, device
                )
                reference = reference_logprobs(model, chosen, device) - reference_logprobs(
                    model, rejected, device
                )
                margins.extend((beta * (policy - reference)).tolist())
    finally:
        model.train(was_training)
    return PreferenceMetrics(
        margins=tuple(margins),
        seconds=time.perf_counter() - started,
        tokens_read=tokens_read,
        device_seconds=clock.seconds,
    )
