"""Per-example language-model losses.

Hugging Face's built-in loss averages tokens over the whole batch, which couples the
examples of a batch; DP-SGD needs each example's gradient to be its own. So each sequence's
loss is the mean over its own assistant tokens, and the batch loss is the mean of those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.client_node.data import IGNORE_INDEX


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position, and the mask of positions that count."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1).clamp(min=0),
        reduction="none",
    ).view_as(shifted_labels)
    return losses * mask, mask


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss over each sequence's own labelled tokens: shape ``[batch]``."""
    losses, mask = token_losses(logits, labels)
    return losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
