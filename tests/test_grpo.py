"""DP-GRPO: group advantages, the clipped-ratio objective with its KL to the base model, and
one prompt as the privacy unit.

The per-prompt gradients are checked against an independent computation: plain autograd,
one prompt at a time, on a copy of the model, with the reference from a separate copy of the
base model and the objective written out here from the logits (no fedtune loss code)."""

import copy
import json
import math

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from conftest import build_tiny_model
from fedtune.client_node.grpo import (
    GRPOSettings,
    GRPOStats,
    clipped_token_objective,
    group_advantages,
    group_losses,
    grpo_objective,
)
from fedtune.client_node.prompt_data import load_prompt_dataset, make_prompt_collate
from fedtune.client_node.rewards import RewardScorer
from fedtune.client_node.trainer import GRAD_SAMPLE_MODE, DPSettings, train_round
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import attach_lora

CPU = torch.device("cpu")
SETTINGS = GRPOSettings(group_size=3, max_completion_tokens=6, beta=0.3, clip_ratio=0.2)


def test_the_objectives_defaults_are_the_configs():
    """A caller of the trainer without a TOML (a benchmark, a notebook) gets what a node's
    config leaves out: 96 completion tokens, not a length that cuts every worked answer."""
    from fedtune.client_node.local_round import grpo_settings
    from fedtune.platform.config import TrainingSettings

    assert GRPOSettings() == grpo_settings(TrainingSettings(method="grpo"))
    assert GRPOSettings().max_completion_tokens == 96


def test_advantages_are_standardised_within_each_group_and_zero_without_spread():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])

    advantages = group_advantages(rewards)

    assert torch.isfinite(advantages).all()
    assert advantages[0].tolist() == [1.0, -1.0, -1.0, 1.0]
    assert advantages[1].tolist() == [0.0] * 4  # nothing beat anything: no signal, not NaN
    assert advantages[2].mean().abs() < 1e-6 and advantages[2, 3] > 0
    assert advantages[2].std(unbiased=False).item() == pytest.approx(1.0)


def test_the_clip_stops_the_gradient_past_the_trust_region_and_kl_is_never_negative():
    logprobs = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.5, -0.5])  # ratios 1, e^0.5 (above 1.2), e^-0.5 (below 0.8)
    reference = torch.tensor([-1.0, -3.0, 0.5])

    loss, kl = clipped_token_objective(
        logprobs, old, reference, torch.tensor([1.0, 1.0, -1.0]), clip_ratio=0.2, beta=0.0
    )
    loss.sum().backward()

    assert logprobs.grad.tolist() == pytest.approx([-1.0, 0.0, 0.0])  # the two clipped: none
    assert kl[0].item() == 0.0 and (kl >= 0).all()
    assert kl[1].item() == pytest.approx(math.exp(-2.0) + 2.0 - 1.0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("grpo") / "train.jsonl"
    rows = [{"prompt": f"fee for {n} transfers", "answer": str(2 * n)} for n in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_prompt_dataset(path, tiny_tokenizer, max_length=48)


def policy_and_base(tiny_tokenizer, *, dtype=torch.float64):
    base = build_tiny_model(len(tiny_tokenizer), seed=0).to(dtype)
    base_copy = copy.deepcopy(base)
    model = attach_lora(base, LoraSettings(r=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    return model, base_copy


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def fixed_groups(prompts, count):
    """Completions of different lengths (token ids from the vocabulary) and advantages with
    a zero-spread group among them."""
    generator = torch.Generator().manual_seed(5)
    completions = [
        [torch.randint(3, 300, (2 + (i + g) % 4,), generator=generator).tolist() for g in range(3)]
        for i in range(count)
    ]
    rewards = torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0], [0.3, 0.1, 0.2]])
    return completions, group_advantages(rewards[:count]).double()


def token_logprobs(model, prompt, completion):
    ids = torch.tensor(prompt + completion)
    logits = model(input_ids=ids[None]).logits[0, :-1]
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(len(prompt) - 1, len(ids) - 1), ids[len(prompt) :]]


def independent_prompt_gradients(model, base, prompts, completions, advantages):
    """Per prompt: its GRPO loss alone, by hand, and torch.autograd.grad on a copy."""
    policy = copy.deepcopy(model)
    names, params = zip(*trainable(policy).items(), strict=True)
    per_prompt = []
    for i, group in enumerate(completions):
        prompt = prompts.prompt_ids[i]
        loss = 0.0
        for g, completion in enumerate(group):
            with torch.no_grad():
                ref = token_logprobs(base, prompt, completion)
            logp = token_logprobs(policy, prompt, completion)
            ratio = torch.exp(logp - logp.detach())
            a = advantages[i, g]
            surrogate = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            loss = loss + (-(surrogate - SETTINGS.beta * kl)).mean() / len(group)
        per_prompt.append(torch.autograd.grad(loss, params))
    return {name: torch.stack([g[k] for g in per_prompt]) for k, name in enumerate(names)}


def flat(grads):
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def test_opacus_per_prompt_gradients_equal_independent_per_prompt_autograd(tiny_tokenizer, prompts):
    """G policy passes over the prompts (pass g: completion g of each) and one backward
    leave each prompt's own gradient in its row of grad_sample."""
    model, base = policy_and_base(tiny_tokenizer)
    count = 4
    completions, advantages = fixed_groups(prompts, count)
    expected = independent_prompt_gradients(model, base, prompts, completions, advantages)
    model.train()
    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=0.0)
    hooks, _, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(list(range(count)), batch_size=count),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        poisson_sampling=False,
        grad_sample_mode=GRAD_SAMPLE_MODE,
        wrap_model=False,
    )
    try:
        losses = group_losses(
            model,
            [prompts.prompt_ids[i] for i in range(count)],
            completions,
            advantages,
            settings=SETTINGS,
            pad_token_id=tiny_tokenizer.pad_token_id,
            device=CPU,
        )
        losses.mean().backward()
        computed = {name: p.grad_sample.detach() for name, p in trainable(model).items()}
    finally:
        hooks.cleanup()

    assert set(computed) == set(expected)
    difference = (flat(computed) - flat(expected)).abs().max().item()
    scale = flat(expected).abs().max().item()
    print(f"per-prompt gradient max abs difference: {difference:.2e} (largest {scale:.2e})")
    assert scale > 0 and difference < 1e-6 * scale
    # The zero-spread group (prompt 1) moves the policy only through its KL term.
    assert flat(computed)[1].norm() < flat(computed)[0].norm()


def length_scorer():
    """A reward with spread inside every group: the completion's length."""
    return RewardScorer(names=("length",), functions=(lambda text, answer: len(text) / 10,))


def grpo_step(model, prompts, tokenizer, *, clip, scorer, settings=SETTINGS, noise=0.0, steps=1):
    before = torch.cat([p.detach().flatten().clone() for p in trainable(model).values()])
    stats = GRPOStats()
    result = train_round(
        model,
        prompts,
        steps=steps,
        batch_size=len(prompts),
        physical_batch_size=2,
        learning_rate=1.0,
        optimizer="sgd",
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        dp=DPSettings(noise_multiplier=noise, max_grad_norm=clip, accountant="rdp"),
        seed=0,
        progress=False,
        per_row_losses=grpo_objective(
            dataset=prompts, tokenizer=tokenizer, scorer=scorer, settings=settings, stats=stats
        ),
        collate=make_prompt_collate(tokenizer.pad_token_id),
    )
    after = torch.cat([p.detach().flatten() for p in trainable(model).values()])
    return before - after, result, stats


def test_with_noise_off_each_prompts_update_is_clipped_to_the_norm(tiny_tokenizer, prompts):
    """Every prompt sampled (rate 1), SGD at learning rate 1: the step is the mean of the
    prompts' clipped gradients, so its norm stays within the clip however large they are."""
    model, _ = policy_and_base(tiny_tokenizer, dtype=torch.float32)
    unclipped, _, _ = grpo_step(
        copy.deepcopy(model), prompts, tiny_tokenizer, clip=1e6, scorer=length_scorer()
    )
    clip = float(unclipped.norm()) / 20

    step, result, stats = grpo_step(
        model, prompts, tiny_tokenizer, clip=clip, scorer=length_scorer()
    )

    assert result.sample_rate == 1.0
    assert 0 < step.norm() <= clip * (1 + 1e-4)
    summary = stats.summary()
    assert stats.completions == len(prompts) * SETTINGS.group_size
    assert 0 < summary["completion_tokens"] <= SETTINGS.max_completion_tokens
    assert summary["kl"] >= 0 and summary["format_share"] == 0.0


def test_groups_without_spread_and_no_kl_leave_the_adapter_unchanged(tiny_tokenizer, prompts):
    """A reward that scores every completion the same teaches nothing: with beta 0 the step
    is exactly zero (no NaN from dividing by a zero spread)."""
    model, _ = policy_and_base(tiny_tokenizer, dtype=torch.float32)
    constant = RewardScorer(names=("constant",), functions=(lambda text, answer: 1.0,))
    settings = GRPOSettings(group_size=3, max_completion_tokens=4, beta=0.0)

    step, result, stats = grpo_step(
        model, prompts, tiny_tokenizer, clip=1.0, scorer=constant, settings=settings
    )

    assert torch.count_nonzero(step) == 0
    assert all(math.isfinite(loss) for loss in result.train_losses if loss is not None)
    assert stats.summary()["mean_reward"] == 1.0


def test_an_empty_poisson_batch_of_prompts_is_a_noise_only_step(tiny_tokenizer, prompts):
    model, _ = policy_and_base(tiny_tokenizer, dtype=torch.float32)
    stats = GRPOStats()

    result = train_round(
        model,
        prompts,
        steps=5,
        batch_size=1,
        physical_batch_size=1,
        learning_rate=0.01,
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=CPU,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
        seed=3,
        progress=False,
        per_row_losses=grpo_objective(
            dataset=prompts,
            tokenizer=tiny_tokenizer,
            scorer=length_scorer(),
            settings=SETTINGS,
            stats=stats,
        ),
        collate=make_prompt_collate(tiny_tokenizer.pad_token_id),
    )

    assert len(result.train_losses) == 5 and None in result.train_losses
    assert sum(steps for _, _, steps in result.history) == 5


# --- what a GRPO round reports as its training tokens ------------------------------------------


def test_a_grpo_steps_tokens_count_sampling_and_both_passes_not_the_prompts_alone(
    tiny_tokenizer, prompts
):
    """Every prompt sampled once (rate 1, one step): sampling reads each prompt G times and
    then the completions; the reference and the policy pass read G rows of prompt and
    completion each. The step loop alone sees the prompts once."""
    model, _ = policy_and_base(tiny_tokenizer, dtype=torch.float32)
    prompt_tokens = sum(len(ids) for ids in prompts.prompt_ids)

    _, result, stats = grpo_step(model, prompts, tiny_tokenizer, clip=1.0, scorer=length_scorer())

    completion_tokens = stats.completion_tokens
    assert completion_tokens > 0
    group = SETTINGS.group_size
    assert stats.tokens == 3 * (group * prompt_tokens + completion_tokens)
    assert result.tokens == prompt_tokens  # what the step loop sees: the prompts once


def test_a_grpo_rounds_reported_tokens_are_what_its_objective_processed(
    tmp_path, tiny_tokenizer, prompts
):
    """A non-private round in full batches (each prompt once per step): the round's token
    count, the cost report's training tokens, is the objective's, not the step loop's."""
    from fedtune.client_node.local_round import train_local_round
    from fedtune.platform.config import PrivacySettings, TrainingSettings
    from fedtune.privacy.node_ledger import NodeLedger

    model, _ = policy_and_base(tiny_tokenizer, dtype=torch.float32)
    training = TrainingSettings(
        steps=2,
        batch_size=len(prompts),
        physical_batch_size=len(prompts),
        method="grpo",
        grpo_group_size=2,
        grpo_max_completion_tokens=5,
        grpo_rewards=["format"],
        seed=0,
    )
    ledger = NodeLedger(tmp_path / "state", node="bank")

    local = train_local_round(
        model,
        prompts,
        ledger=ledger,
        data_fingerprint="sha256:" + "a" * 64,
        base_model_fingerprint="sha256:" + "b" * 64,
        training=training,
        privacy=PrivacySettings(mode="non-private"),
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=CPU,
        progress=False,
        tokenizer=tiny_tokenizer,
    )
    ledger.close()

    completions = 2 * len(prompts) * 2  # steps x prompts x G
    completion_tokens = round(local.grpo["completion_tokens"] * completions)
    prompt_tokens = 2 * sum(len(ids) for ids in prompts.prompt_ids)  # every prompt, each step
    assert local.result.tokens == 3 * (2 * prompt_tokens + completion_tokens)
