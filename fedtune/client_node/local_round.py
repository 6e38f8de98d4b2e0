"""One round of local training with its privacy bookkeeping: the piece that `fedtune node
train` and the federated ClientApp share.

Plans the noise from what this data set already spent, asks the budget guard, trains, and
appends the round to the node's signed epsilon ledger *before* the caller releases anything
trained on the data.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from peft import PeftModel

from fedtune.client_node.data import ChatDataset, DataError
from fedtune.client_node.dpo import pair_objective
from fedtune.client_node.grpo import GRPOSettings, GRPOStats, grpo_objective
from fedtune.client_node.preference_data import (
    PAIR_FORM,
    PreferenceDataset,
    make_pair_collate,
)
from fedtune.client_node.prompt_data import PROMPT_FORM, PromptDataset, make_prompt_collate
from fedtune.client_node.rewards import build_scorer
from fedtune.client_node.trainer import (
    DPSettings,
    RoundResult,
    sample_rate_for,
    train_round,
)
from fedtune.platform.config import PrivacySettings, TrainingSettings
from fedtune.privacy.accounting import (
    BudgetExhaustedError,
    HistoryEntry,
    accountant_version,
    calibrate_noise_multiplier,
    epsilon_of,
)
from fedtune.privacy.budget_guard import check_round
from fedtune.privacy.ledger import (
    Checkpoint,
    LedgerEntry,
    privacy_unit_of,
    training_round_method,
)
from fedtune.privacy.node_ledger import NodeLedger

NON_PRIVATE_LABEL = "NON-PRIVATE (no differential privacy)"
# A data set that has spent this share of its target trains no more: the rest would need
# noise that drowns the update.
SPENT_SHARE = 0.99


def plan_noise_multiplier(
    privacy: PrivacySettings,
    *,
    history: list[HistoryEntry],
    sample_rate: float,
    steps: int,
    remaining_rounds: int | None = None,
) -> float:
    """Noise for the next round so that the planned rounds end at the target epsilon.

    The plan is ``privacy.planned_rounds`` rounds of ``steps`` steps on this data set; rounds
    already in ``history`` count against it. A federated run passes ``remaining_rounds`` (its
    rounds left, this one included) instead: what is left of the target is spread over them,
    whatever earlier runs or an interrupted round spent. Refuses a round past the plan or
    the target.
    """
    if remaining_rounds is None:
        remaining_rounds = privacy.planned_rounds - len(history)  # one entry per round
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        spent = epsilon_of(history, delta=privacy.delta, accountant=privacy.accountant)
        if remaining_rounds <= 0:
            raise BudgetExhaustedError(
                f"all {privacy.planned_rounds} planned rounds on this data set are done "
                f"(epsilon {spent:.3f} of target {privacy.target_epsilon:g}); raise "
                "privacy.planned_rounds and privacy.target_epsilon to train more"
            )
        if privacy.target_epsilon * SPENT_SHARE <= spent < privacy.target_epsilon:
            raise BudgetExhaustedError(
                f"this data set has already spent epsilon {spent:.3f} of its target "
                f"{privacy.target_epsilon:g}: the noise a further round would need drowns it; "
                "raise privacy.target_epsilon (within the cap) to train more"
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


@dataclass(frozen=True)
class LocalRound:
    result: RoundResult
    budget: dict[str, Any]  # the plan: target epsilon, planned rounds ({} when non-private)
    entry: LedgerEntry  # what was appended to the node's ledger: the round's privacy record
    checkpoint: Checkpoint  # the node's signature over its ledger's new head
    # With data.shares_budget_with: the group's epsilon after the round (what the guard
    # counted); None without a group or when non-private. Stays on the node.
    group_epsilon: float | None = None
    # With method = "grpo": the round's health (mean reward, format share, completion
    # length, KL), seconds spent sampling and scoring, and the rewards' failures by row.
    grpo: dict[str, Any] | None = None


def planned_epsilon(
    privacy: PrivacySettings,
    *,
    before_run: list[HistoryEntry],
    sample_rate: float,
    steps: int,
    rounds_done: int | None,
) -> float | None:
    """The epsilon the run's plan expects after ``rounds_done`` of its ``planned_rounds``
    rounds: the noise that ends the plan at the target (given what the data set spent
    before the run), composed ``rounds_done`` times. The coordinator alarms a node that spent
    more (ahead of plan), not one on its plan. None outside a federated run, or when no plan
    fits."""
    if rounds_done is None or rounds_done < 1:
        return None
    try:
        sigma = calibrate_noise_multiplier(
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            sample_rate=sample_rate,
            steps=steps * privacy.planned_rounds,
            accountant=privacy.accountant,
            history=before_run,
        )
    except (BudgetExhaustedError, ValueError):
        return None
    return epsilon_of(
        [*before_run, *[(sigma, sample_rate, steps)] * rounds_done],
        delta=privacy.delta,
        accountant=privacy.accountant,
    )


def train_local_round(
    model: PeftModel,
    train_data: ChatDataset | PreferenceDataset | PromptDataset,
    *,
    ledger: NodeLedger,
    data_fingerprint: str,
    base_model_fingerprint: str,
    training: TrainingSettings,
    privacy: PrivacySettings,
    pad_token_id: int,
    device: torch.device,
    run_id: str | None = None,
    server_round: int | None = None,
    remaining_rounds: int | None = None,
    progress: bool = True,
    budget_group: Sequence[str] = (),
    tokenizer: Any = None,
) -> LocalRound:
    """Train the adapter of ``model`` for one round and record the round on the data set.

    ``training.method`` chooses the objective: ``"sft"`` on a :class:`ChatDataset`,
    ``"dpo"`` on a :class:`PreferenceDataset` (one pair is then the privacy unit),
    ``"grpo"`` on a :class:`PromptDataset` (one prompt; sampling needs ``tokenizer``).
    ``budget_group``: fingerprints of other data sets holding the same people
    (``data.shares_budget_with``); the noise plan and the budget guard count their private
    rounds with this data set's, while the entry's ``epsilon_after`` stays this data set's
    own (what an auditor recomputes per fingerprint).

    Raises :class:`BudgetExhaustedError` before any training when the round would pass the
    data set's (or its group's) target epsilon or its cap.
    """
    if training.steps == "auto" or training.batch_size == "auto":
        raise ValueError("plan the training first (TrainingSettings.planned)")
    grpo_stats = GRPOStats()
    objective = _objective(training, train_data, pad_token_id, tokenizer, grpo_stats)
    history = ledger.dp_history(data_fingerprint)
    group = [data_fingerprint, *(f for f in budget_group if f != data_fingerprint)]
    counted = ledger.group_dp_history(group) if len(group) > 1 else history
    sample_rate = sample_rate_for(len(train_data), training.batch_size)
    dp = None
    group_epsilon = None
    if privacy.mode == "dp":
        sigma = plan_noise_multiplier(
            privacy,
            history=counted,
            sample_rate=sample_rate,
            steps=training.steps,
            remaining_rounds=(
                remaining_rounds
                if remaining_rounds is not None
                else privacy.planned_rounds - len(history)
            ),
        )
        after = check_round(
            counted,
            (sigma, sample_rate, training.steps),
            cap=privacy.cap,
            delta=privacy.delta,
            accountant=privacy.accountant,
            subject="the data set's" if len(group) == 1 else "its budget group's",
        )
        group_epsilon = after if len(group) > 1 else None
        dp = DPSettings(
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            accountant=privacy.accountant,
            history=history,
        )
    result = train_round(
        model,
        train_data,
        steps=training.steps,
        batch_size=training.batch_size,
        physical_batch_size=training.physical_batch_size,
        learning_rate=training.learning_rate,
        optimizer=training.optimizer,
        pad_token_id=pad_token_id,
        device=device,
        dp=dp,
        seed=training.seed,
        progress=progress,
        **objective,
    )
    if training.method == "grpo":
        # The step loop sees only the prompts; the objective sampled G completions per
        # prompt and ran the reference and policy passes over them: count what it read.
        result = replace(result, tokens=grpo_stats.tokens)
    epsilon_after = epsilon_round = None
    if dp is not None:
        epsilon_after = epsilon_of(
            result.history, delta=privacy.delta, accountant=privacy.accountant
        )
        epsilon_round = epsilon_of(
            [(dp.noise_multiplier, result.sample_rate, result.steps)],
            delta=privacy.delta,
            accountant=privacy.accountant,
        )
    method = training_round_method(
        training.method, private=dp is not None, seeded=training.seed is not None
    )
    entry, checkpoint = ledger.append(
        {
            "run_id": run_id or f"local-{uuid.uuid4().hex[:12]}",
            "round": server_round or 1,
            "base_model_fingerprint": base_model_fingerprint,
            "data_fingerprint": data_fingerprint,
            "mode": privacy.mode,
            "steps": result.steps,
            "sample_rate": result.sample_rate,
            "noise_multiplier": dp.noise_multiplier if dp else None,
            "max_grad_norm": privacy.max_grad_norm if dp else None,
            "delta": privacy.delta if dp else None,
            "epsilon_round": epsilon_round,
            "epsilon_after": epsilon_after,
            "epsilon_cap": privacy.cap if dp else None,
            "accountant": privacy.accountant if dp else None,
            "accountant_version": accountant_version() if dp else None,
            "kind": "training_round",
            "method": method,
            "privacy_unit": privacy_unit_of(method) if dp else None,
        }
    )
    budget = (
        {
            "target_epsilon": privacy.target_epsilon,
            "planned_rounds": privacy.planned_rounds,
            "private_rounds_on_data_set": len(history) + 1,
            "planned_epsilon": planned_epsilon(
                privacy,
                before_run=[
                    (e.noise_multiplier, e.sample_rate, e.steps)
                    for e in ledger.entries(data_fingerprint)
                    if e.mode == "dp" and e.noise_multiplier is not None and e.run_id != run_id
                ],
                sample_rate=result.sample_rate,
                steps=result.steps,
                rounds_done=server_round,
            ),
            # The group the guard counted: the other data sets' fingerprints (what the
            # ledger knows them by) and the group's epsilon after this round.
            **(
                {"budget_group": sorted(group[1:]), "group_epsilon": group_epsilon}
                if group_epsilon is not None
                else {}
            ),
        }
        if dp is not None
        else {}
    )
    return LocalRound(
        result=result,
        budget=budget,
        entry=entry,
        checkpoint=checkpoint,
        group_epsilon=group_epsilon,
        grpo=_grpo_report(grpo_stats, result) if training.method == "grpo" else None,
    )


def _grpo_report(stats: GRPOStats, result: RoundResult) -> dict[str, Any]:
    sampling = stats.seconds["generation"] + stats.seconds["reward"]
    return {
        **stats.summary(),
        "seconds": {**stats.seconds, "update": max(result.device_seconds - sampling, 0.0)},
        "reward_failures": list(stats.failures),
    }


def _objective(
    training: TrainingSettings,
    data: ChatDataset | PreferenceDataset | PromptDataset,
    pad_token_id: int,
    tokenizer: Any,
    stats: GRPOStats,
) -> dict[str, Any]:
    """The trainer's per-row loss and batching for ``training.method``; refuses data of
    another kind in one line."""
    if training.method == "grpo":
        if not isinstance(data, PromptDataset):
            raise DataError(
                f'{data.source}: holds no prompts with answers: training.method = "grpo" '
                f"needs rows {PROMPT_FORM}"
            )
        if tokenizer is None:
            raise ValueError("GRPO samples completions: pass the tokenizer")
        scorer = build_scorer(training.grpo_rewards, tolerance=training.grpo_numeric_tolerance)
        stats.failures = scorer.failures
        return {
            "per_row_losses": grpo_objective(
                dataset=data,
                tokenizer=tokenizer,
                scorer=scorer,
                settings=grpo_settings(training),
                stats=stats,
            ),
            "collate": make_prompt_collate(pad_token_id),
        }
    if isinstance(data, PromptDataset):
        raise DataError(
            f"{data.source}: holds prompts with answers {PROMPT_FORM}, which training.method = "
            f'"{training.method}" does not train on; set training.method = "grpo"'
        )
    if training.method == "dpo":
        if not isinstance(data, PreferenceDataset):
            raise DataError(
                f'{data.source}: holds no preference pairs: training.method = "dpo" needs '
                f"rows {PAIR_FORM}"
            )
        return {
            "per_row_losses": pair_objective(training.dpo_beta),
            "collate": make_pair_collate(pad_token_id),
        }
    if not isinstance(data, ChatDataset):
        raise DataError(
            f'{data.source}: holds preference pairs, which training.method = "sft" does not '
            'train on; set training.method = "dpo"'
        )
    return {}


def grpo_settings(training: TrainingSettings) -> GRPOSettings:
    """The GRPO objective's settings from ``training.grpo_*``."""
    return GRPOSettings(
        group_size=training.grpo_group_size,
        max_completion_tokens=training.grpo_max_completion_tokens,
        temperature=training.grpo_temperature,
        beta=training.grpo_beta,
        clip_ratio=training.grpo_clip_ratio,
    )
