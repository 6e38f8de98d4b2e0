"""One round of local LoRA training, with DP-SGD (Opacus) or, for comparison, without.

A round is a fixed number of optimizer steps over logical batches. Under DP the logical
batches are Poisson-sampled (each example joins with probability ``sample_rate``), every
example's gradient is clipped to ``max_grad_norm`` and Gaussian noise of
``noise_multiplier * max_grad_norm`` is added to their sum; logical batches are computed in
physical micro-batches (Opacus' ``BatchMemoryManager``), because DP needs large logical
batches for the noise to be small relative to the signal.

Per-example gradients use Opacus' "hooks" mode: measured on SmolLM2-135M with LoRA on CPU it
costs about 1.05x the non-private step, against 1.07x for functorch and 1.56x for ghost
clipping (see benchmarks/dp_overhead.py).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedtune.client_node.data import ChatDataset, DataError, make_collate
from fedtune.client_node.losses import sequence_losses
from fedtune.client_node.preference_data import PreferenceDataset
from fedtune.client_node.prompt_data import PromptDataset
from fedtune.platform.model.devices import DeviceClock
from fedtune.privacy.accounting import AccountantName, HistoryEntry

GRAD_SAMPLE_MODE = "hooks"
NOISE_RNG = "torch.Generator (not a CSPRNG: Opacus secure_mode needs torchcsprng)"

# The loss of each row of a physical batch (shape ``[rows]``): one row is one privacy unit,
# an example for SFT, a preference pair for DPO (:func:`fedtune.client_node.dpo.pair_objective`).
PerRowLosses = Callable[[torch.nn.Module, Any, torch.device], torch.Tensor]


@dataclass(frozen=True)
class DPSettings:
    """What DP-SGD needs for one round; the history is what this data set spent before."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: AccountantName
    history: Sequence[HistoryEntry] = ()


@dataclass
class RoundResult:
    steps: int
    train_losses: list[float | None]  # None: an empty Poisson batch (a noise-only step)
    num_examples: int
    sample_rate: float
    seconds: float
    # Tokens the training forward passes read: prompt and answer, padding excluded (the
    # attention mask's ones), summed over every physical batch of the round. For GRPO the
    # caller puts in what the objective processed (fedtune.client_node.grpo.GRPOStats.tokens:
    # sampling, reference and policy passes), which the step loop does not see.
    tokens: int = 0
    # Seconds the round's step loop ran on the device (forward, backward, clipping and noise,
    # optimizer steps; batch collation between them), the device synchronised at both ends.
    device_seconds: float = 0.0
    # The accountant's full history after the round (prior rounds plus this one); empty
    # when training was not private.
    history: list[HistoryEntry] = field(default_factory=list)


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sample rate for an expected logical batch of ``batch_size`` (as Opacus' data
    loader derives it: one over the number of batches per epoch)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def train_round(
    model: PeftModel,
    dataset: ChatDataset | PreferenceDataset | PromptDataset,
    *,
    steps: int,
    batch_size: int,
    physical_batch_size: int,
    learning_rate: float,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    pad_token_id: int,
    device: torch.device,
    dp: DPSettings | None,
    seed: int | None = None,
    progress: bool = True,
    per_row_losses: PerRowLosses = sequence_losses,
    collate: Callable[[list[Any]], Any] | None = None,
) -> RoundResult:
    """Train the adapter of ``model`` in place for ``steps`` optimizer steps.

    ``dp=None`` trains without differential privacy (labelled non-private by callers).
    ``seed=None`` draws batches and noise from fresh randomness; a seed reproduces both.
    ``per_row_losses`` and ``collate`` say what a row is and costs (default: a conversation
    and its language-model loss); under DP each row's gradient is clipped as one.
    """
    unit = getattr(dataset, "unit", "examples")
    if len(dataset) < batch_size:
        raise DataError(
            f"{dataset.source}: the data set has {len(dataset)} usable {unit}, fewer than "
            f"one batch (training.batch_size = {batch_size})"
        )
    if seed is not None:
        torch.manual_seed(seed)
    else:
        torch.seed()
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable (adapter) parameters")
    model.train()
    torch_optimizer: torch.optim.Optimizer
    if optimizer == "adamw":
        torch_optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    else:
        torch_optimizer = torch.optim.SGD(parameters, lr=learning_rate)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate or make_collate(pad_token_id),
    )
    started = time.perf_counter()
    bar = tqdm(total=steps, desc="training steps", unit="step", disable=not progress)
    work = _Work(DeviceClock(device))
    try:
        if dp is None:
            losses = _train_plain(
                model,
                torch_optimizer,
                loader,
                steps,
                physical_batch_size,
                device,
                bar,
                per_row_losses,
                work,
            )
            history: list[HistoryEntry] = []
            sample_rate = batch_size / len(dataset)
        else:
            losses, history, sample_rate = _train_private(
                model,
                torch_optimizer,
                loader,
                steps,
                physical_batch_size,
                device,
                bar,
                dp,
                per_row_losses,
                work,
            )
    finally:
        bar.close()
    return RoundResult(
        steps=steps,
        train_losses=losses,
        num_examples=len(dataset),
        sample_rate=sample_rate,
        seconds=time.perf_counter() - started,
        tokens=work.tokens,
        device_seconds=work.clock.seconds,
        history=history,
    )


@dataclass
class _Work:
    """What a round's step loop did: tokens read and time on the device."""

    clock: DeviceClock
    tokens: int = 0

    def read(self, batch: dict[str, torch.Tensor]) -> None:
        # An SFT batch has one attention mask; a DPO batch one per answer (chosen_ and
        # rejected_attention_mask): both passes are read.
        self.tokens += sum(
            int(mask.sum()) for key, mask in batch.items() if key.endswith("attention_mask")
        )


def _train_plain(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    physical_batch_size: int,
    device: torch.device,
    bar: tqdm,
    per_row_losses: PerRowLosses,
    work: _Work,
) -> list[float | None]:
    """Non-private reference: fixed-size shuffled batches, gradient accumulation."""
    losses: list[float | None] = []
    with work.clock:
        while len(losses) < steps:
            for batch in loader:
                size = _batch_size(batch)
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for start in range(0, size, physical_batch_size):
                    chunk = {k: v[start : start + physical_batch_size] for k, v in batch.items()}
                    work.read(chunk)
                    per_example = per_row_losses(model, chunk, device)
                    (per_example.sum() / size).backward()
                    total += float(per_example.detach().sum())
                optimizer.step()
                losses.append(total / size)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if len(losses) == steps:
                    break
    return losses


def _train_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    physical_batch_size: int,
    device: torch.device,
    bar: tqdm,
    dp: DPSettings,
    per_row_losses: PerRowLosses,
    work: _Work,
) -> tuple[list[float | None], list[HistoryEntry], float]:
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off: secure_mode needs torchcsprng, which has
        # no build for current Python. Noise comes from torch's generator, seeded from OS
        # randomness unless a seed is configured; metrics record this as "noise_rng".
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=dp.accountant)
    engine.accountant.history = list(dp.history)
    # wrap_model=False keeps the PeftModel itself (no "_module." key prefix) and lets the
    # hooks be removed after the round, so the same model trains again next round.
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=GRAD_SAMPLE_MODE,
        wrap_model=False,
    )
    assert isinstance(dp_optimizer, DPOptimizer)
    sample_rate = float(dp_loader.sample_rate)
    losses: list[float | None] = []
    pending_loss, pending_examples = 0.0, 0

    accounting_hook = dp_optimizer.step_hook

    def on_real_step(optim: DPOptimizer) -> None:
        # Called by Opacus after clipping and noising, only on the last physical batch of a
        # logical batch: exactly once per optimizer step that the accountant counts.
        nonlocal pending_loss, pending_examples
        if accounting_hook is not None:
            accounting_hook(optim)
        losses.append(pending_loss / pending_examples if pending_examples else None)
        pending_loss, pending_examples = 0.0, 0
        bar.update(1)
        if losses[-1] is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")

    dp_optimizer.attach_step_hook(on_real_step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        with (
            warnings.catch_warnings(),
            BatchMemoryManager(
                data_loader=dp_loader,
                max_physical_batch_size=physical_batch_size,
                optimizer=dp_optimizer,
            ) as physical_loader,
            work.clock,
        ):
            # Opacus' hooks sit on LoRA layers of a frozen base whose inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            while len(losses) < steps:
                for batch in physical_loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    size = _batch_size(batch)
                    if size == 0:
                        _prepare_noise_only_step(trainable)
                    else:
                        work.read(batch)
                        per_example = per_row_losses(model, batch, device)
                        per_example.mean().backward()
                        pending_loss += float(per_example.detach().sum())
                        pending_examples += size
                    dp_optimizer.step()
                    if len(losses) == steps:
                        break
    finally:
        hooks.cleanup()
        for parameter in trainable:
            parameter.grad = None
    return losses, list(engine.accountant.history), sample_rate


def _prepare_noise_only_step(trainable: list[torch.nn.Parameter]) -> None:
    """An empty Poisson batch still is a step (skipping it would break the accounting): the
    model cannot forward zero rows, so hand Opacus empty per-example gradients and let it
    add the noise."""
    for parameter in trainable:
        parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))  # type: ignore[attr-defined]


def _batch_size(batch: object) -> int:
    if isinstance(batch, dict):  # every value has one row per unit (example or pair)
        return int(next(iter(batch.values())).shape[0])
    if isinstance(batch, (list, tuple)):
        return 0 if not batch else int(batch[0].shape[0])
    raise TypeError(f"unexpected batch type {type(batch).__name__}")
