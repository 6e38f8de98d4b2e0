"""`fedtune node train`: one round of DP-LoRA training on the node's data, end to end.

Loads the base model and data, plans the noise, trains, records the round in the node's
privacy state *before* releasing anything, then writes a PEFT adapter directory and a metrics
JSON into a new, timestamped folder (earlier outputs are never overwritten).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.evaluation import HeldOutMetrics, evaluate
from fedtune.client_node.privacy_state import PrivacyState, RoundRecord
from fedtune.client_node.trainer import (
    GRAD_SAMPLE_MODE,
    NOISE_RNG,
    DPSettings,
    sample_rate_for,
    train_round,
)
from fedtune.platform.accounting import (
    BudgetExhaustedError,
    HistoryEntry,
    accountant_label,
    calibrate_noise_multiplier,
    epsilon_of,
)
from fedtune.platform.base_model import load_base_model
from fedtune.platform.config import NodeConfig, PrivacySettings
from fedtune.platform.fingerprint import file_fingerprint
from fedtune.platform.lora import attach_lora

NON_PRIVATE_LABEL = "NON-PRIVATE (no differential privacy)"


def plan_noise_multiplier(
    privacy: PrivacySettings,
    *,
    history: list[HistoryEntry],
    sample_rate: float,
    steps: int,
) -> float:
    """Noise for the next round so that the planned rounds end at the target epsilon.

    The plan is ``privacy.planned_rounds`` rounds of ``steps`` steps on this data set; rounds
    already in ``history`` count against it. Refuses a round past the plan or the target.
    """
    remaining_rounds = privacy.planned_rounds - len(history)  # one history entry per round
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        if remaining_rounds <= 0:
            spent = epsilon_of(history, delta=privacy.delta, accountant=privacy.accountant)
            raise BudgetExhaustedError(
                f"all {privacy.planned_rounds} planned rounds on this data set are done "
                f"(epsilon {spent:.3f} of target {privacy.target_epsilon:g}); raise "
                "privacy.planned_rounds and privacy.target_epsilon to train more"
            )
        sigma = calibrate_noise_multiplier(
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            sample_rate=sample_rate,
            steps=remaining_rounds * steps,
            accountant=privacy.accountant,
            history=history,
        )
    after = epsilon_of(
        [*history, (sigma, sample_rate, steps)], delta=privacy.delta, accountant=privacy.accountant
    )
    if after > privacy.target_epsilon * 1.001:
        raise BudgetExhaustedError(
            f"this round would bring epsilon to {after:.3f}, past the target "
            f"{privacy.target_epsilon:g} (delta {privacy.delta:g})"
        )
    return sigma


def run_node_training(config: NodeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train one round as configured; returns the metrics that were written to disk."""
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    base = load_base_model(config.model)
    tokenizer = base.tokenizer
    pad_id = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    train_data = load_chat_dataset(config.data.train, tokenizer, max_length=config.data.max_length)
    held_out = load_chat_dataset(
        config.data.eval,
        tokenizer,
        max_length=config.data.max_length,
        limit=config.data.max_eval_examples,
    )
    data_fingerprint = file_fingerprint(config.data.train)
    state = PrivacyState(
        config.node.state_dir, base_model=base.fingerprint, data_set=data_fingerprint
    )
    records = state.rounds()
    history = state.dp_history()
    privacy = config.privacy
    training = config.training
    private = privacy.mode == "dp"
    sample_rate = sample_rate_for(len(train_data), training.batch_size)
    dp = None
    if private:
        sigma = plan_noise_multiplier(
            privacy, history=history, sample_rate=sample_rate, steps=training.steps
        )
        dp = DPSettings(
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            accountant=privacy.accountant,
            history=history,
        )

    before = evaluate(base.model, held_out, pad_token_id=pad_id, device=base.device)
    model = attach_lora(base.model, config.lora)
    result = train_round(
        model,
        train_data,
        steps=training.steps,
        batch_size=training.batch_size,
        physical_batch_size=training.physical_batch_size,
        learning_rate=training.learning_rate,
        optimizer=training.optimizer,
        pad_token_id=pad_id,
        device=base.device,
        dp=dp,
        seed=training.seed,
        progress=progress,
    )
    privacy_report: dict[str, Any]
    epsilon_after: float | None
    epsilon_round: float | None
    if dp is not None:
        epsilon_after = epsilon_of(
            result.history, delta=privacy.delta, accountant=privacy.accountant
        )
        epsilon_round = epsilon_of(
            [(dp.noise_multiplier, result.sample_rate, result.steps)],
            delta=privacy.delta,
            accountant=privacy.accountant,
        )
        privacy_report = {
            "mode": "dp",
            "epsilon": epsilon_after,
            "epsilon_this_round": epsilon_round,
            "delta": privacy.delta,
            "noise_multiplier": dp.noise_multiplier,
            "sample_rate": result.sample_rate,
            "max_grad_norm": privacy.max_grad_norm,
            "accountant": accountant_label(privacy.accountant),
            "grad_sample_mode": GRAD_SAMPLE_MODE,
            "noise_rng": NOISE_RNG if training.seed is None else f"seeded ({training.seed})",
            "target_epsilon": privacy.target_epsilon,
            "planned_rounds": privacy.planned_rounds,
            "private_rounds_on_data_set": len(history) + 1,
        }
    else:
        epsilon_after = epsilon_round = None
        privacy_report = {
            "mode": "non-private",
            "label": NON_PRIVATE_LABEL,
            "epsilon": None,
            "sample_rate": result.sample_rate,
        }
    run_id = f"local-{uuid.uuid4().hex[:12]}"
    finished = datetime.now(UTC)
    state.append(
        RoundRecord(
            mode=privacy.mode,
            run=run_id,
            round=len(records) + 1,
            steps=result.steps,
            sample_rate=result.sample_rate,
            noise_multiplier=dp.noise_multiplier if dp else None,
            max_grad_norm=privacy.max_grad_norm if dp else None,
            delta=privacy.delta if dp else None,
            accountant=accountant_label(privacy.accountant) if dp else None,
            epsilon_round=epsilon_round,
            epsilon_after=epsilon_after,
            finished_at=finished.isoformat(),
        )
    )
    after = evaluate(model, held_out, pad_token_id=pad_id, device=base.device)
    out_dir = _new_output_dir(config.output.dir, finished, privacy.mode)
    model.save_pretrained(str(out_dir / "adapter"))
    metrics = {
        "node": config.node.name,
        "run": run_id,
        "finished_at": finished.isoformat(),
        "device": str(base.device),
        "base_model": {"spec": config.model.spec, "fingerprint": base.fingerprint},
        "data_set": {
            "train": str(config.data.train),
            "fingerprint": data_fingerprint,
            "examples": len(train_data),
            "dropped_too_long": train_data.dropped,
            "held_out": str(config.data.eval),
            "held_out_examples": len(held_out),
        },
        "lora": config.lora.model_dump(),
        "training": {**training.model_dump(), "seconds": result.seconds},
        "steps": result.steps,
        "train_loss": result.train_losses,
        "held_out": {"before": _held_out(before), "after": _held_out(after)},
        "privacy": privacy_report,
        "adapter_dir": str(out_dir / "adapter"),
        "privacy_state": str(state.path),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics


def _held_out(metrics: HeldOutMetrics) -> dict[str, Any]:
    return asdict(metrics)


def _new_output_dir(root: Path, when: datetime, mode: str) -> Path:
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    path = root / f"{stamp}-{mode}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{stamp}-{mode}-{suffix}"
    path.mkdir(parents=True)
    return path
