"""DP-SGD really clips and noises, and its accounting is the accountant's own."""

import pytest
import torch

from conftest import build_tiny_model
from fedtune.client_node.data import DataError, load_chat_dataset
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.privacy.accounting import epsilon_of, make_accountant

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("data")
    train, _ = write_demo_data(folder, domain="bank", train=40, held_out=5)
    return load_chat_dataset(train, tiny_tokenizer, max_length=96)


def fresh_model(tiny_tokenizer):
    return attach_lora(build_tiny_model(len(tiny_tokenizer), seed=0), LoraSettings(r=4))


def adapter_vector(model):
    return torch.cat([torch.from_numpy(a).flatten() for a in adapter_arrays(model).values()])


def train(
    model, dataset, tokenizer, *, dp, steps=1, batch_size=8, seed=0, optimizer="adamw", lr=1e-2
):
    return train_round(
        model,
        dataset,
        steps=steps,
        batch_size=batch_size,
        physical_batch_size=4,
        learning_rate=lr,
        optimizer=optimizer,
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        dp=dp,
        seed=seed,
        progress=False,
    )


def sgd_update_norm(tokenizer, dataset, clip):
    """One DP-SGD step, lr 1, no noise, sample rate 1 (every example in the batch): the
    update is the mean of the clipped per-example gradients."""
    model = fresh_model(tokenizer)
    start = adapter_vector(model)
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp")
    result = train(
        model, dataset, tokenizer, dp=dp, batch_size=len(dataset), optimizer="sgd", lr=1.0
    )
    assert result.sample_rate == 1.0
    return float((adapter_vector(model) - start).norm())


def test_each_example_gradient_is_clipped_to_the_clip_norm(tiny_tokenizer, dataset):
    clip = 1e-4

    unclipped = sgd_update_norm(tiny_tokenizer, dataset, clip=1e6)
    clipped = sgd_update_norm(tiny_tokenizer, dataset, clip=clip)

    # The mean of vectors each of norm <= clip has norm <= clip; without clipping the same
    # step is orders of magnitude larger.
    assert unclipped > 100 * clip
    assert clipped <= clip * (1 + 1e-4)
    assert clipped > 0.1 * clip


def test_noise_makes_runs_differ_and_a_seed_reproduces_them(tiny_tokenizer, dataset):
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp")
    models = [fresh_model(tiny_tokenizer) for _ in range(3)]

    for model, seed in zip(models, (1, 1, 2), strict=True):
        train(model, dataset, tiny_tokenizer, dp=dp, steps=2, seed=seed)

    first, same_seed, other_seed = (adapter_vector(m) for m in models)
    assert torch.equal(first, same_seed)
    assert not torch.allclose(first, other_seed)


def test_noise_is_there_even_when_batches_match(tiny_tokenizer, dataset):
    """With every example in every batch (sample rate 1), only the noise can differ."""
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp")
    a, b = fresh_model(tiny_tokenizer), fresh_model(tiny_tokenizer)

    train(a, dataset, tiny_tokenizer, dp=dp, batch_size=len(dataset), seed=1)
    train(b, dataset, tiny_tokenizer, dp=dp, batch_size=len(dataset), seed=2)

    assert not torch.allclose(adapter_vector(a), adapter_vector(b))


def test_epsilon_after_a_run_equals_a_fresh_accountant_replaying_its_history(
    tiny_tokenizer, dataset
):
    prior = [(1.1, 0.2, 7)]
    dp = DPSettings(noise_multiplier=0.9, max_grad_norm=1.0, accountant="rdp", history=prior)

    result = train(fresh_model(tiny_tokenizer), dataset, tiny_tokenizer, dp=dp, steps=3)

    replay = make_accountant("rdp")
    for sigma, rate, steps in [*prior, (0.9, result.sample_rate, 3)]:
        for _ in range(steps):
            replay.step(noise_multiplier=sigma, sample_rate=rate)
    assert epsilon_of(result.history, delta=1e-5, accountant="rdp") == pytest.approx(
        replay.get_epsilon(delta=1e-5), rel=1e-12
    )
    assert sum(steps for _, _, steps in result.history) == 7 + 3


def test_non_private_training_lowers_training_loss(tiny_tokenizer, dataset):
    result = train(fresh_model(tiny_tokenizer), dataset, tiny_tokenizer, dp=None, steps=15, lr=3e-2)

    assert result.history == []
    assert sum(result.train_losses[-3:]) < sum(result.train_losses[:3])


def test_data_set_smaller_than_a_batch_is_refused(tiny_tokenizer, dataset):
    with pytest.raises(DataError, match="fewer than one batch"):
        train(
            fresh_model(tiny_tokenizer),
            dataset,
            tiny_tokenizer,
            dp=None,
            batch_size=len(dataset) + 1,
        )


def test_empty_poisson_batches_are_noise_only_steps_that_count(tiny_tokenizer, dataset):
    """At batch size 1 of 40 examples about a third of Poisson batches are empty."""
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp")
    model = fresh_model(tiny_tokenizer)
    start = adapter_vector(model)

    result = train(model, dataset, tiny_tokenizer, dp=dp, steps=12, batch_size=1, seed=3)

    empty_steps = sum(loss is None for loss in result.train_losses)
    assert len(result.train_losses) == 12
    assert 0 < empty_steps < 12
    assert sum(steps for _, _, steps in result.history) == 12
    assert not torch.equal(adapter_vector(model), start)
