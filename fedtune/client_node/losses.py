"""Per-example language-model losses over assistant tokens.

Hugging Face's built-in loss averages tokens over the whole batch, which couples the
examples of a batch; DP-SGD needs each example's gradient to be its own. So each sequence's
loss is the mean over its own assistant tokens, and the batch loss is the mean of those.

The output projection is applied only at the positions that count: with a 49k-token
vocabulary it is a large part of the work, and most positions (system prompt, question,
padding) carry no label.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.client_node.data import IGNORE_INDEX, Batch


def labelled_token_losses(
    model: nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Next-token cross-entropy at each labelled position, with the row it belongs to.

    Returns ``(losses [n], rows [n], batch_size)``.
    """
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    targets = batch["labels"].to(device)[:, 1:]
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    causal_lm: Any = model
    if hasattr(model, "get_base_model"):  # a PeftModel: its base model holds the LoRA layers
        causal_lm = model.get_base_model()  # type: ignore[operator]
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    head = causal_lm.get_output_embeddings()
    if decoder is None or head is None or _post_processes_logits(causal_lm):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        selected = logits[:, :-1][rows, columns]
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = head(hidden[:, :-1][rows, columns])
    # At least float32 (half-precision logits lose too much in a log-softmax).
    selected = selected.to(torch.promote_types(selected.dtype, torch.float32))
    losses = F.cross_entropy(selected, targets[rows, columns], reduction="none")
    return losses, rows, input_ids.shape[0]


def _post_processes_logits(causal_lm: nn.Module) -> bool:
    config = getattr(causal_lm, "config", None)
    return bool(getattr(config, "final_logit_softcapping", None)) or bool(
        getattr(config, "logit_scale", None)
    )


def sequence_losses(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean loss over each sequence's own labelled tokens: shape ``[batch]``."""
    losses, rows, size = labelled_token_losses(model, batch, device)
    sums = torch.zeros(size, device=losses.device, dtype=losses.dtype).index_add(0, rows, losses)
    counts = torch.bincount(rows, minlength=size).clamp(min=1)
    return sums / counts
