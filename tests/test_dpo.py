"""DP-DPO: the loss, the reference model, and one preference pair as the privacy unit.

The per-pair gradients are checked against an independent computation: plain autograd, one
pair at a time, on a copy of the model, with the reference taken from a separate copy of the
base model and the log-probabilities written out here (no fedtune loss code)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from conftest import build_tiny_model
from fedtune.client_node.data import IGNORE_INDEX
from fedtune.client_node.dpo import (
    answer_logprobs,
    dpo_loss,
    pair_losses,
    pair_objective,
    reference_logprobs,
)
from fedtune.client_node.preference_data import (
    load_preference_dataset,
    make_pair_collate,
    split_pair_batch,
)
from fedtune.client_node.trainer import GRAD_SAMPLE_MODE, DPSettings, train_round
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import attach_lora

CPU = torch.device("cpu")
BETA = 0.5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("preferences")
    train, _ = write_demo_preferences(folder, domain="hospital", train=6, held_out=1)
    return load_preference_dataset(train, tiny_tokenizer, max_length=96)


def trained_away_from_base(tiny_tokenizer, *, seed=0, dtype=torch.float32):
    """The tiny base model (and a copy of it) with a LoRA adapter whose B matrices are not
    zero, so that the policy differs from the reference."""
    base = build_tiny_model(len(tiny_tokenizer), seed=seed).to(dtype)
    base_copy = copy.deepcopy(base)
    model = attach_lora(base, LoraSettings(r=4))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    return model, base_copy


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def one_batch(pairs, tokenizer):
    return make_pair_collate(tokenizer.pad_token_id)([pairs[i] for i in range(len(pairs))])


def plain_logprob(model, input_ids, labels):
    """Sum of log p(token) over one sequence's labelled tokens, straight from the logits."""
    logits = model(input_ids=input_ids[None]).logits[0, :-1]
    targets = labels[1:]
    keep = targets != IGNORE_INDEX
    return torch.log_softmax(logits, dim=-1)[keep, targets[keep]].sum()


def independent_pair_gradients(model, base, pairs, *, beta):
    """Per pair: its DPO loss alone, by hand, and torch.autograd.grad on a copy of ``model``.
    Returns ``{parameter name: [pairs, *shape]}``."""
    policy = copy.deepcopy(model)
    names, params = zip(*trainable(policy).items(), strict=True)
    per_pair = []
    for index in range(len(pairs)):
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = pairs[index]
        with torch.no_grad():
            ref_c = plain_logprob(base, chosen_ids, chosen_labels)
            ref_r = plain_logprob(base, rejected_ids, rejected_labels)
        pol_c = plain_logprob(policy, chosen_ids, chosen_labels)
        pol_r = plain_logprob(policy, rejected_ids, rejected_labels)
        loss = -F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r)))
        per_pair.append(torch.autograd.grad(loss, params))
    return {name: torch.stack([g[i] for g in per_pair]) for i, name in enumerate(names)}


def flat(grads):
    """``[pairs, total]`` from ``{name: [pairs, *shape]}``."""
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def test_the_dpo_loss_is_the_papers_formula_on_fixed_logprobs():
    policy_chosen = torch.tensor([-10.0, -4.0])
    policy_rejected = torch.tensor([-12.0, -3.0])
    reference_chosen = torch.tensor([-11.0, -4.0])
    reference_rejected = torch.tensor([-11.5, -4.0])

    losses = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1
    )

    # pair 0: margin (-10 + 11) - (-12 + 11.5) = 1.5; pair 1: 0 - 1 = -1
    expected = [math.log(1 + math.exp(-0.1 * 1.5)), math.log(1 + math.exp(0.1 * 1.0))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # the same answers under the reference and the policy: log 2, whatever beta
    same = dpo_loss(policy_chosen, policy_rejected, policy_chosen, policy_rejected, beta=7.0)
    assert same.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-6)


def test_the_reference_is_the_base_model_without_gradient_and_leaves_training_as_it_was(
    tiny_tokenizer, pairs
):
    model, base = trained_away_from_base(tiny_tokenizer)
    model.train()
    trainable_before = set(trainable(model))
    chosen, _ = split_pair_batch(one_batch(pairs, tiny_tokenizer))

    reference = reference_logprobs(model, chosen, CPU)
    policy = answer_logprobs(model, chosen, CPU)

    expected = torch.stack(
        [plain_logprob(base, pairs[i][0], pairs[i][1]).detach() for i in range(len(pairs))]
    )
    assert not reference.requires_grad and policy.requires_grad
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert (policy.detach() - reference).abs().max() > 1e-3  # the adapter is back on
    # PEFT's disable_adapter() marks every adapter weight trainable on leaving: the frozen
    # A matrices (FFA-LoRA) must stay frozen.
    assert set(trainable(model)) == trainable_before
    assert all("lora_B" in name for name in trainable_before)


def test_opacus_per_pair_gradients_equal_independent_per_pair_autograd(tiny_tokenizer, pairs):
    """Two policy passes (chosen, rejected) and one backward under Opacus' hooks leave each
    pair's own gradient in its row of grad_sample. The model is in float64 (Llama still
    normalises in float32), so that the comparison is not lost in rounding: in float32 both
    computations lie about 3e-6 from the float64 gradients."""
    model, base = trained_away_from_base(tiny_tokenizer, dtype=torch.float64)
    expected = independent_pair_gradients(model, base, pairs, beta=BETA)
    model.train()
    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=0.0)
    loader = DataLoader(pairs, batch_size=len(pairs))
    hooks, _, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        poisson_sampling=False,
        grad_sample_mode=GRAD_SAMPLE_MODE,
        wrap_model=False,
    )
    try:
        pair_losses(model, one_batch(pairs, tiny_tokenizer), CPU, beta=BETA).mean().backward()
        computed = {name: p.grad_sample.detach() for name, p in trainable(model).items()}
    finally:
        hooks.cleanup()

    assert set(computed) == set(expected)
    for name, grad in expected.items():
        assert computed[name].shape == grad.shape
    difference = (flat(computed) - flat(expected)).abs().max().item()
    scale = flat(expected).abs().max().item()
    print(f"per-pair gradient max abs difference: {difference:.2e} (largest value {scale:.2e})")
    assert difference < 1e-6 * scale


def dp_sgd_update(model, pairs, tokenizer, *, clip):
    """One DP-SGD step through the trainer: every pair sampled (rate 1), no noise, SGD with
    learning rate 1, physical batches of 2: the update is minus the mean clipped pair
    gradient."""
    before = {name: p.detach().clone() for name, p in trainable(model).items()}
    result = train_round(
        model,
        pairs,
        steps=1,
        batch_size=len(pairs),
        physical_batch_size=2,
        learning_rate=1.0,
        optimizer="sgd",
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        dp=DPSettings(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp"),
        seed=0,
        progress=False,
        per_row_losses=pair_objective(BETA),
        collate=make_pair_collate(tokenizer.pad_token_id),
    )
    assert result.sample_rate == 1.0
    return torch.cat(
        [(before[name] - p.detach()).flatten() for name, p in trainable(model).items()]
    )


@pytest.mark.parametrize("clip", [1e6, "smallest pair norm"])
def test_the_trainer_clips_each_preference_pair_as_one(tiny_tokenizer, pairs, clip):
    """With a clip below some pairs' gradient norms, the step is the mean of the pairs'
    gradients each clipped as a whole: what clipping each answer apart would not give."""
    model, base = trained_away_from_base(tiny_tokenizer, dtype=torch.float64)
    per_pair = flat(independent_pair_gradients(model, base, pairs, beta=BETA))
    norms = per_pair.norm(dim=1)
    if clip != 1e6:
        clip = float(norms.min()) * 1.01
        assert (norms > clip * 1.5).any()  # clipping bites
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)

    step = dp_sgd_update(model, pairs, tiny_tokenizer, clip=clip)

    expected = (per_pair * factors[:, None]).mean(dim=0)
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert step.norm() <= min(clip, float(norms.max())) * (1 + 1e-4)


def test_an_empty_poisson_batch_of_pairs_is_a_noise_only_step(tiny_tokenizer, pairs):
    """One expected pair per batch out of six: some batches hold none; they still count
    (skipping them would break the accounting) and change the adapter by noise alone."""
    model, _ = trained_away_from_base(tiny_tokenizer)
    before = torch.cat([p.detach().flatten().clone() for p in trainable(model).values()])

    result = train_round(
        model,
        pairs,
        steps=6,
        batch_size=1,
        physical_batch_size=1,
        learning_rate=0.01,
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=CPU,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
        seed=3,
        progress=False,
        per_row_losses=pair_objective(BETA),
        collate=make_pair_collate(tiny_tokenizer.pad_token_id),
    )

    assert len(result.train_losses) == 6 and None in result.train_losses
    assert any(loss is not None for loss in result.train_losses)
    assert sum(steps for _, _, steps in result.history) == 6
    after = torch.cat([p.detach().flatten() for p in trainable(model).values()])
    assert not torch.equal(before, after)
