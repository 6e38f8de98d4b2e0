"""Held-out evaluation on the node's own data; only the figures leave this module."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtune.client_node.data import ChatDataset, make_collate
from fedtune.client_node.losses import labelled_token_losses
from fedtune.platform.model.devices import DeviceClock


@dataclass(frozen=True)
class HeldOutMetrics:
    loss: float  # mean negative log-likelihood per assistant token
    perplexity: float
    examples: int
    tokens: int  # labelled (assistant) tokens the loss is over
    seconds: float
    example_losses: tuple[float, ...] = ()  # each example's mean loss over its own tokens
    # The cost: tokens the forward passes read (prompt and answer, padding excluded), and
    # seconds in the evaluation loop on the device (synchronised at both ends).
    tokens_read: int = 0
    device_seconds: float = 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ChatDataset,
    *,
    pad_token_id: int,
    device: torch.device,
    batch_size: int = 8,
) -> HeldOutMetrics:
    """Token-weighted held-out loss and perplexity (exp of the loss)."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=make_collate(pad_token_id))
    total_loss, total_tokens, tokens_read = 0.0, 0, 0
    example_losses: list[float] = []
    clock = DeviceClock(device)
    try:
        with clock:
            for batch in loader:
                tokens_read += int(batch["attention_mask"].sum())
                losses, rows, size = labelled_token_losses(model, batch, device)
                total_loss += float(losses.sum())
                total_tokens += losses.numel()
                sums = torch.zeros(size, dtype=losses.dtype, device=losses.device).index_add(
                    0, rows, losses
                )
                counts = torch.bincount(rows, minlength=size).clamp(min=1)
                example_losses.extend((sums / counts).tolist())
    finally:
        model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    return HeldOutMetrics(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        examples=len(dataset),
        tokens=total_tokens,
        seconds=time.perf_counter() - started,
        example_losses=tuple(example_losses),
        tokens_read=tokens_read,
        device_seconds=clock.seconds,
    )
