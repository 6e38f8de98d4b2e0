"""`fedtune audit canaries`: the empirical privacy audit of a node's training, with canaries.

Plants random secrets (:mod:`fedtune.client_node.canaries`) in a copy of the node's training
data, trains the node's LoRA adapter twice from the same start with the node's plan (logical
batch, steps, learning rate): once with the node's DP settings and once without DP, and
measures in each (:mod:`fedtune.privacy.audit.empirical`):

- each secret's exposure, its rank by loss among random candidates of the same format;
- a lower bound on epsilon from guessing which membership canaries were planted.

The private run's bound must stay below the epsilon its accountant reports; the
non-private run shows what DP prevented.

**The node's ledger and budget are out of reach**: this module never opens a ledger (it
imports neither :mod:`fedtune.privacy.node_ledger` nor the ledger store; a test checks), it
trains with :func:`fedtune.client_node.trainer.train_round`, which has no ledger or budget
guard, its noise is planned for a fresh data set (the planted copy is one), and the config
it works with has its state folder and output replaced by a temporary folder that is deleted
afterwards, with the planted copy in it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch.utils.data import DataLoader

from fedtune.client_node.canaries import (
    Canary,
    candidate_secrets,
    draw_canaries,
    secret_space,
    write_planted_copy,
)
from fedtune.client_node.data import (
    ChatDataset,
    load_chat_dataset,
    make_collate,
    tokenize_conversation,
)
from fedtune.client_node.local_round import plan_noise_multiplier
from fedtune.client_node.losses import sequence_losses
from fedtune.client_node.trainer import DPSettings, sample_rate_for, train_round
from fedtune.common.errors import FedtuneError
from fedtune.platform.config import NodeConfig, TrainingSettings
from fedtune.platform.model.base_model import BaseModel, load_base_model
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_adapter_arrays
from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.audit.empirical import (
    audit_membership,
    extrapolated_exposure,
    sampled_exposure,
    sampled_rank,
)

SCORING_BATCH = 32


class CanaryAuditError(FedtuneError, ValueError):
    """The canary audit cannot run as asked."""


@dataclass(frozen=True)
class CanaryOptions:
    """What to plant and how to measure. Defaults keep one audit of SmolLM2-135M on a CPU
    at a few minutes beyond the node's two trainings."""

    secrets: int = 4  # k exposure canaries
    repeats: int = 8  # copies of each in the training data
    membership: int = 64  # m membership canaries, each planted with probability 1/2
    candidates: int = 127  # per secret, for its rank (sampled exposure up to log2(128) = 7 bits)
    digits: int = 6  # secret space 10^6 (19.9 bits)
    confidence: float = 0.95
    steps: int | None = None  # None: the node's plan
    seed: int | None = None  # canaries and candidates; None: fresh randomness

    def __post_init__(self) -> None:
        for name in ("secrets", "repeats", "membership", "candidates", "digits"):
            if getattr(self, name) < 1:
                raise CanaryAuditError(f"{name.replace('_', '-')} must be at least 1")
        if self.membership < 2:
            raise CanaryAuditError("membership must be at least 2 (half are left out)")
        if self.candidates < 3:
            raise CanaryAuditError("candidates must be at least 3 (for the skew-normal fit)")
        if self.candidates >= secret_space(self.digits):
            raise CanaryAuditError(
                f"candidates ({self.candidates}) must be fewer than the 10^{self.digits} "
                "secrets of the format"
            )
        if not 0 < self.confidence < 1:
            raise CanaryAuditError("confidence must lie strictly between 0 and 1")
        if self.steps is not None and self.steps < 1:
            raise CanaryAuditError("steps must be at least 1")


def run_canary_audit(
    config: NodeConfig, *, options: CanaryOptions, progress: bool = True
) -> dict[str, Any]:
    """Load the node's base model and run :func:`audit_canaries` on its training data."""
    if config.privacy.mode != "dp":
        raise CanaryAuditError(
            f"node {config.node.name}: privacy.mode is 'non-private': there are no DP "
            "settings to audit"
        )
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    _say(progress, f"loading the base model {config.model.spec}")
    base = load_base_model(config.model)
    return audit_canaries(config, base=base, options=options, progress=progress)


def audit_canaries(
    config: NodeConfig,
    *,
    base: BaseModel,
    options: CanaryOptions,
    progress: bool = True,
    non_private: bool = True,
) -> dict[str, Any]:
    """The audit with an already loaded base model (its LoRA-wrapped copy is trained twice;
    once, with DP only, when ``non_private`` is false)."""
    if config.privacy.mode != "dp":
        raise CanaryAuditError(f"node {config.node.name}: privacy.mode is not 'dp'")
    rng = np.random.default_rng(options.seed)
    canaries = draw_canaries(
        secrets=options.secrets,
        repeats=options.repeats,
        membership=options.membership,
        digits=options.digits,
        rng=rng,
    )
    tokenizer = base.tokenizer
    pad_id = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="fedtune-canary-audit-") as folder:
        work = Path(folder)
        # Whatever would look for the node's state or output finds the throwaway folder.
        config = config.model_copy(
            update={
                "node": config.node.model_copy(update={"state_dir": work / "state"}),
                "output": None,
            }
        )
        planted = work / "train-with-canaries.jsonl"
        written = write_planted_copy(config.data.train, canaries, planted, rng=rng)
        data = load_chat_dataset(planted, tokenizer, max_length=config.data.max_length)
        if len(data) + data.dropped != written:
            raise CanaryAuditError(f"{planted}: expected {written} examples")
        if not all(_fits(c, tokenizer, config.data.max_length) for c in canaries):
            raise CanaryAuditError(
                f"data.max_length = {config.data.max_length} cuts the canaries' answers off"
            )
        training = _training(config, len(data), options)
        sample_rate = sample_rate_for(len(data), int(training.batch_size))
        sigma = plan_noise_multiplier(
            config.privacy, history=[], sample_rate=sample_rate, steps=int(training.steps)
        )
        epsilon = epsilon_of(
            [(sigma, sample_rate, int(training.steps))],
            delta=config.privacy.delta,
            accountant=config.privacy.accountant,
        )
        model = attach_lora(base.model, config.lora)
        initial = adapter_arrays(model)
        scorer = _Scorer(model, tokenizer, pad_id, base.device, config.data.max_length)
        candidates = {
            c.patient: candidate_secrets(
                c, count=options.candidates, digits=options.digits, rng=rng
            )
            for c in canaries
            if c.kind == "secret"
        }
        members = [c for c in canaries if c.kind == "membership"]
        _say(progress, f"scoring {len(members)} membership canaries before training")
        before = scorer.losses([c.conversation() for c in members])
        runs = []
        for private in (True, False) if non_private else (True,):
            load_adapter_arrays(model, initial)
            label = "DP" if private else "non-private"
            _say(
                progress, f"training ({label}): {training.steps} steps, batch {training.batch_size}"
            )
            dp = (
                DPSettings(
                    noise_multiplier=sigma,
                    max_grad_norm=config.privacy.max_grad_norm,
                    accountant=config.privacy.accountant,
                )
                if private
                else None
            )
            result = train_round(
                model,
                data,
                steps=int(training.steps),
                batch_size=int(training.batch_size),
                physical_batch_size=training.physical_batch_size,
                learning_rate=training.learning_rate,
                optimizer=training.optimizer,
                pad_token_id=pad_id,
                device=base.device,
                dp=dp,
                seed=training.seed,
                progress=progress,
            )
            _say(progress, f"scoring ({label}): secrets against their candidates, membership")
            run = _measure(scorer, canaries, candidates, before, options, config.privacy.delta)
            losses = [x for x in result.train_losses if x is not None]
            runs.append(
                {
                    "mode": "dp" if private else "non-private",
                    "epsilon": epsilon if private else None,
                    "noise_multiplier": sigma if private else None,
                    "seconds": result.seconds,
                    "train_loss_first": losses[0] if losses else None,
                    "train_loss_last": losses[-1] if losses else None,
                    **run,
                }
            )
        load_adapter_arrays(model, initial)
    private_run = runs[0]
    bound = private_run["membership"]["epsilon_lower_bound"]
    return {
        "audit": "canaries",
        "node": config.node.name,
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(base.device),
        "base_model": {"spec": config.model.spec, "fingerprint": base.fingerprint},
        "data_set": {
            "train": str(config.data.train),
            "fingerprint": file_fingerprint(config.data.train),
            "examples_with_canaries": len(data),
            "planted_examples": sum(c.copies for c in canaries),
            "copy": "a temporary file, deleted after the audit; the node's file is only read",
        },
        "options": asdict(options),
        "canary_format": {
            "user": "What is the medical record number of patient FIRST LAST?",
            "assistant": "MRN D D D D D D (the secret: uniform random digits)",
            "secret_space": secret_space(options.digits),
        },
        "training": {
            "batch_size": training.batch_size,
            "physical_batch_size": training.physical_batch_size,
            "steps": training.steps,
            "learning_rate": training.learning_rate,
            "optimizer": training.optimizer,
            "sample_rate": sample_rate,
        },
        "privacy": {
            "target_epsilon": config.privacy.target_epsilon,
            "planned_rounds": config.privacy.planned_rounds,
            "delta": config.privacy.delta,
            "max_grad_norm": config.privacy.max_grad_norm,
            "accountant": config.privacy.accountant,
            "noise_multiplier": sigma,
            "epsilon": epsilon,
        },
        "runs": runs,
        "verdict": {
            "lower_bound_within_epsilon": bound <= epsilon,
            "epsilon": epsilon,
            "epsilon_lower_bound_dp": bound,
            "epsilon_lower_bound_non_private": runs[1]["membership"]["epsilon_lower_bound"]
            if non_private
            else None,
        },
        "ledger": "untouched: the audit trains with no ledger and no budget guard",
    }


def _training(config: NodeConfig, examples: int, options: CanaryOptions) -> TrainingSettings:
    """The node's plan for the planted copy's size, with the audit's steps if given."""
    training = config.training.planned(
        examples, privacy=config.privacy, rounds=config.privacy.planned_rounds
    )
    if options.steps is not None:
        training = training.model_copy(update={"steps": options.steps})
    if int(training.batch_size) > examples:
        raise CanaryAuditError(
            f"{config.data.train}: {examples} examples with the canaries, fewer than one batch "
            f"(training.batch_size = {training.batch_size})"
        )
    return training


def _measure(
    scorer: _Scorer,
    canaries: Sequence[Canary],
    candidates: dict[str, list[str]],
    before: list[float],
    options: CanaryOptions,
    delta: float,
) -> dict[str, Any]:
    """Exposure of each secret and the one-run membership audit, with the model as it is."""
    space = secret_space(options.digits)
    secrets = []
    for canary in (c for c in canaries if c.kind == "secret"):
        losses = scorer.losses(
            [canary.conversation(), *(canary.conversation(s) for s in candidates[canary.patient])]
        )
        own, others = losses[0], losses[1:]
        secrets.append(
            {
                "patient": canary.patient,
                "secret": canary.secret,
                "copies": canary.copies,
                "loss": own,
                "rank_in_sample": sampled_rank(own, others),
                "exposure_sampled": sampled_exposure(own, others),
                "exposure_extrapolated": extrapolated_exposure(own, others, space_size=space),
            }
        )
    members = [c for c in canaries if c.kind == "membership"]
    after = scorer.losses([c.conversation() for c in members])
    scores = [b - a for b, a in zip(before, after, strict=True)]  # how much the loss fell
    audit = audit_membership(
        scores, [c.included for c in members], delta=delta, confidence=options.confidence
    )
    return {
        "secrets": secrets,
        "exposure_sampled_mean": float(np.mean([s["exposure_sampled"] for s in secrets])),
        "exposure_extrapolated_mean": float(np.mean([s["exposure_extrapolated"] for s in secrets])),
        "exposure_sampled_max_possible": math.log2(options.candidates + 1),
        "exposure_max_possible": math.log2(space),
        "membership": {**asdict(audit), "guesses": audit.guesses},
        "membership_scores": {
            "included_mean": _mean([s for s, c in zip(scores, members, strict=True) if c.included]),
            "left_out_mean": _mean(
                [s for s, c in zip(scores, members, strict=True) if not c.included]
            ),
        },
    }


class _Scorer:
    """Each conversation's mean loss over its answer tokens, without gradients."""

    def __init__(
        self, model: PeftModel, tokenizer: Any, pad_id: int, device: torch.device, max_length: int
    ):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.collate = make_collate(pad_id)
        self.max_length = max_length

    def losses(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[float]:
        examples = [
            tokenize_conversation(c, self.tokenizer, max_length=self.max_length)
            for c in conversations
        ]
        data = ChatDataset(examples, source=Path("<canaries>"))
        loader = DataLoader(data, batch_size=SCORING_BATCH, collate_fn=self.collate)
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        try:
            with torch.no_grad():
                for batch in loader:
                    out += sequence_losses(self.model, batch, self.device).tolist()
        finally:
            self.model.train(was_training)
        return out


def _fits(canary: Canary, tokenizer: Any, max_length: int) -> bool:
    """Whether the whole canary, answer included, fits in ``max_length`` tokens."""
    example = tokenize_conversation(canary.conversation(), tokenizer, max_length=max_length)
    return len(example.input_ids) < max_length


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
