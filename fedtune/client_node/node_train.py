"""`fedtune node train`: one round of DP-LoRA training on the node's data, end to end.

Loads the base model and data, plans the noise, asks the budget guard, trains, appends the
round to the node's signed epsilon ledger *before* releasing anything, then writes a PEFT
adapter directory and a metrics JSON into a new, timestamped folder (earlier outputs are never
overwritten).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedtune.client_node.evaluation import HeldOutMetrics, evaluate
from fedtune.client_node.grpo import held_out_reward
from fedtune.client_node.local_round import LocalRound, grpo_settings, train_local_round
from fedtune.client_node.prompt_data import PromptDataset, load_prompt_dataset
from fedtune.client_node.rewards import build_scorer
from fedtune.client_node.training_data import (
    budget_group_fingerprints,
    load_held_out,
    load_training_data,
)
from fedtune.platform.config import ConfigError, NodeConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.model.lora import attach_lora
from fedtune.privacy.node_ledger import NodeLedger, ledger_url


def run_node_training(config: NodeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train one round as configured; returns the metrics that were written to disk."""
    output = config.output
    if output is None:
        raise ConfigError(f"node {config.node.name}: output.dir is required to train locally")
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    base = load_base_model(config.model)
    tokenizer = base.tokenizer
    pad_id = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    train_data = load_training_data(
        config.data.train,
        tokenizer,
        method=config.training.method,
        max_length=config.data.max_length,
        loss_on_thinking=config.data.loss_on_thinking,
    )
    held_out = load_held_out(
        config.data.eval,
        tokenizer,
        max_length=config.data.max_length,
        limit=config.data.max_eval_examples,
        loss_on_thinking=config.data.loss_on_thinking,
    )
    data_fingerprint = file_fingerprint(config.data.train)
    group = budget_group_fingerprints(config.data.shares_budget_with)
    ledger = NodeLedger(config.node.state_dir, node=config.node.name)
    before = evaluate(base.model, held_out, pad_token_id=pad_id, device=base.device)
    reward_before = _held_out_reward(config, base.model, tokenizer, base.device)
    model = attach_lora(base.model, config.lora)
    training = config.training.planned(
        len(train_data), privacy=config.privacy, rounds=config.privacy.planned_rounds
    )
    if config.training.is_planned and progress:
        print(
            f"planned training (privacy planner, {len(train_data)} "
            f"{getattr(train_data, 'unit', 'examples')}): logical batch "
            f"{training.batch_size}, {training.steps} steps per round"
        )
    config = config.model_copy(update={"training": training})  # recorded in metrics.json
    local = train_local_round(
        model,
        train_data,
        ledger=ledger,
        data_fingerprint=data_fingerprint,
        base_model_fingerprint=base.fingerprint,
        training=config.training,
        privacy=config.privacy,
        pad_token_id=pad_id,
        device=base.device,
        progress=progress,
        budget_group=group,
        tokenizer=tokenizer,
    )
    result, entry = local.result, local.entry
    finished = datetime.fromisoformat(entry.recorded_at.replace("Z", "+00:00"))
    after = evaluate(model, held_out, pad_token_id=pad_id, device=base.device)
    reward_after = _held_out_reward(config, model, tokenizer, base.device)
    out_dir = _new_output_dir(output.dir, finished, config.privacy.mode)
    model.save_pretrained(str(out_dir / "adapter"))
    metrics = {
        "node": config.node.name,
        "run": entry.run_id,
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
        "training": {**config.training.model_dump(), "seconds": result.seconds},
        "steps": result.steps,
        "train_loss": result.train_losses,
        "held_out": {
            "before": {**_held_out(before), **reward_before},
            "after": {**_held_out(after), **reward_after},
        },
        # The round's signed ledger entry as it was sealed, and the budget's plan.
        "privacy": {**local.entry.payload(), **local.budget, **_group(config, local)},
        **({"grpo": local.grpo} if local.grpo is not None else {}),
        "adapter_dir": str(out_dir / "adapter"),
        "ledger": {
            "database": ledger_url(config.node.state_dir),
            "seq": entry.seq,
            "hash": entry.hash,
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics


def _held_out_reward(
    config: NodeConfig, model: torch.nn.Module, tokenizer: Any, device: torch.device
) -> dict[str, float]:
    """With method = "grpo": the mean reward of the most likely completion per held-out
    prompt (and the share in the format); nothing for other methods."""
    if config.training.method != "grpo":
        return {}
    prompts: PromptDataset = load_prompt_dataset(
        config.data.eval,
        tokenizer,
        max_length=config.data.max_length,
        limit=config.data.max_eval_examples,
    )
    training = config.training
    scores = held_out_reward(
        model,
        prompts,
        tokenizer=tokenizer,
        scorer=build_scorer(training.grpo_rewards, tolerance=training.grpo_numeric_tolerance),
        settings=grpo_settings(training),
        device=device,
    )
    return {"mean_reward": scores["mean_reward"], "format_share": scores["format_share"]}


def _group(config: NodeConfig, local: LocalRound) -> dict[str, Any]:
    """The budget group the guard counted (data.shares_budget_with), if there is one."""
    if not config.data.shares_budget_with:
        return {}
    return {
        "budget_group": {
            "shares_budget_with": [str(path) for path in config.data.shares_budget_with],
            "epsilon_after": local.group_epsilon,
        }
    }


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
