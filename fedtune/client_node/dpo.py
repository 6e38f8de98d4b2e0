"""Direct preference optimisation (Rafailov et al. 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model") on a LoRA adapter, one loss per pair.

The policy is the base model with the adapter; the reference is the same base model with
the adapter disabled (PEFT's ``disable_adapter()``), so no second copy of the weights is
held. The reference pass runs under ``no_grad``: Opacus' hooks record nothing there.

Under DP-SGD the privacy unit is one preference pair. Opacus' hooks (``grad_sample_mode =
"hooks"``) store each forward pass's activations and, in the backward pass, add each pass's
per-row gradients into the same per-row slots. So a chosen pass and a rejected pass over the
same pairs in the same row order, then one backward of the pairs' losses, leave in row ``i``
the gradient of pair ``i``'s loss, which Opacus clips as one vector before the noise
(``tests/test_dpo.py`` checks it against plain per-pair autograd).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.client_node.data import Batch
from fedtune.client_node.losses import labelled_token_losses
from fedtune.client_node.preference_data import split_pair_batch


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` from the
    answers' summed log-probabilities; shape ``[pairs]``."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def answer_logprobs(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Each row's summed log-probability of its labelled (answer) tokens: shape ``[rows]``."""
    losses, rows, size = labelled_token_losses(model, batch, device)
    return -torch.zeros(size, device=losses.device, dtype=losses.dtype).index_add(0, rows, losses)


def reference_logprobs(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """:func:`answer_logprobs` of the base model: the adapter disabled, no gradient."""
    with torch.no_grad(), _adapter_disabled(model):
        return answer_logprobs(model, batch, device)


@contextmanager
def _adapter_disabled(model: nn.Module) -> Iterator[None]:
    """PEFT's ``disable_adapter()``, keeping which parameters train: leaving it marks every
    adapter weight trainable, which would unfreeze FFA-LoRA's A matrices."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise TypeError("DPO's reference is the base model with the adapter disabled: a PEFT model")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with disable():
            yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])


def pair_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, *, beta: float
) -> torch.Tensor:
    """Per-pair DPO losses of a batch from :func:`make_pair_collate`: reference passes
    first (no grad), then the chosen and the rejected pass of the policy, in that order.

    Opacus' hooks keep each layer's activations as a stack; autograd runs the backward of
    the later (rejected) pass before the earlier one, so each backward meets its own pass's
    activations, and both add into the same per-row slots (``tests/test_dpo.py``)."""
    chosen, rejected = split_pair_batch(batch)
    reference_chosen = reference_logprobs(model, chosen, device)
    reference_rejected = reference_logprobs(model, rejected, device)
    return dpo_loss(
        answer_logprobs(model, chosen, device),
        answer_logprobs(model, rejected, device),
        reference_chosen,
        reference_rejected,
        beta=beta,
    )


def pair_objective(
    beta: float,
) -> Callable[[nn.Module, dict[str, torch.Tensor], torch.device], torch.Tensor]:
    """The trainer's per-row loss for DPO with ``beta``."""

    def losses(
        model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        return pair_losses(model, batch, device, beta=beta)

    return losses
