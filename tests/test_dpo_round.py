"""A DP-DPO round as a node records it: the ledger entry's method and privacy unit, the
independent accountant, and one budget for data sets that hold the same people."""

import pytest
import torch

from conftest import build_tiny_model
from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.local_round import train_local_round
from fedtune.client_node.preference_data import load_preference_dataset
from fedtune.demo.data import write_demo_data
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.config import LoraSettings, PrivacySettings, TrainingSettings
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.model.lora import attach_lora
from fedtune.privacy.accounting import BudgetExhaustedError, epsilon_of
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.node_ledger import NodeLedger

CPU = torch.device("cpu")
DPO = TrainingSettings(steps=2, batch_size=8, physical_batch_size=4, method="dpo")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bank's SFT file and the preference pairs made from the same records."""
    folder = tmp_path_factory.mktemp("data")
    sft, _ = write_demo_data(folder, domain="bank", train=32, held_out=2)
    pairs, _ = write_demo_preferences(folder, domain="bank", train=32, held_out=2)
    return sft, pairs


def round_on(ledger, path, tokenizer, *, training, privacy, group=()):
    if training.method == "dpo":
        data = load_preference_dataset(path, tokenizer, max_length=96)
    else:
        data = load_chat_dataset(path, tokenizer, max_length=96)
    return train_local_round(
        attach_lora(build_tiny_model(len(tokenizer)), LoraSettings(r=4)),
        data,
        ledger=ledger,
        data_fingerprint=file_fingerprint(path),
        base_model_fingerprint="sha256:" + "b" * 64,
        training=training,
        privacy=privacy,
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        progress=False,
        budget_group=group,
    )


def test_dpo_rounds_are_recorded_over_preference_pairs_and_recompute_independently(
    tmp_path, tiny_tokenizer, files
):
    ledger = NodeLedger(tmp_path / "state", node="bank")
    privacy = PrivacySettings(target_epsilon=4.0, planned_rounds=2)
    _, pairs = files

    first = round_on(ledger, pairs, tiny_tokenizer, training=DPO, privacy=privacy)
    second = round_on(ledger, pairs, tiny_tokenizer, training=DPO, privacy=privacy)

    for local in (first, second):
        entry = local.entry
        assert (entry.method, entry.privacy_unit, entry.kind) == (
            "dp-dpo",
            "preference_pair",
            "training_round",
        )
        # pairs, each one privacy unit (those with an answer past max_length left out)
        assert local.result.num_examples == len(
            load_preference_dataset(pairs, tiny_tokenizer, max_length=96)
        )
        assert all(loss is None or loss > 0 for loss in local.result.train_losses)
    assert 0 < first.entry.epsilon_after < second.entry.epsilon_after <= 4.0 * 1.001
    checks = recompute_ledger([entry.to_dict() for entry in ledger.entries()])
    assert [check.agrees for check in checks] == [True, True]


def test_a_seeded_dpo_round_says_its_noise_is_reproducible(tmp_path, tiny_tokenizer, files):
    ledger = NodeLedger(tmp_path / "state", node="bank")
    training = DPO.model_copy(update={"seed": 0, "steps": 1})

    local = round_on(ledger, files[1], tiny_tokenizer, training=training, privacy=PrivacySettings())

    assert (local.entry.method, local.entry.privacy_unit) == (
        "dp-dpo-seeded-noise",
        "preference_pair",
    )


def test_preference_pairs_of_the_same_people_count_against_one_budget(
    tmp_path, tiny_tokenizer, files
):
    """An SFT round, then a DPO round on pairs made from the same records: alone each fits
    the cap; grouped (data.shares_budget_with), their composition does not, and the guard
    declines before training. The entry's own epsilon stays per data set."""
    sft, pairs = files
    sft_training = TrainingSettings(steps=2, batch_size=8, physical_batch_size=4, seed=0)
    fixed = {"noise_multiplier": 1.0, "target_epsilon": 50.0}
    ledger = NodeLedger(tmp_path / "state", node="bank")
    sft_round = round_on(
        ledger, sft, tiny_tokenizer, training=sft_training, privacy=PrivacySettings(**fixed)
    )
    rate = sft_round.entry.sample_rate
    alone = epsilon_of([(1.0, rate, 2)], delta=1e-5, accountant="rdp")
    together = epsilon_of([(1.0, rate, 2)] * 2, delta=1e-5, accountant="rdp")
    cap = (alone + together) / 2
    privacy = PrivacySettings(**fixed, epsilon_cap=cap)
    before = len(ledger.entries())

    with pytest.raises(BudgetExhaustedError) as declined:
        round_on(
            ledger,
            pairs,
            tiny_tokenizer,
            training=DPO,
            privacy=privacy,
            group=[file_fingerprint(sft)],
        )
    ungrouped = round_on(ledger, pairs, tiny_tokenizer, training=DPO, privacy=privacy)

    assert "its budget group's epsilon" in str(declined.value)
    assert f"to {together:.3f}" in str(declined.value)
    assert len(ledger.entries()) == before + 1  # the declined round left no entry
    assert ungrouped.entry.epsilon_after == pytest.approx(alone, rel=1e-9)
    assert ungrouped.group_epsilon is None


def test_a_grouped_round_that_fits_records_its_own_epsilon_and_the_groups(
    tmp_path, tiny_tokenizer, files
):
    sft, pairs = files
    fixed = PrivacySettings(noise_multiplier=1.0, target_epsilon=50.0)
    ledger = NodeLedger(tmp_path / "state", node="bank")
    sft_training = TrainingSettings(steps=2, batch_size=8, physical_batch_size=4)
    round_on(ledger, sft, tiny_tokenizer, training=sft_training, privacy=fixed)

    local = round_on(
        ledger, pairs, tiny_tokenizer, training=DPO, privacy=fixed, group=[file_fingerprint(sft)]
    )

    rate = local.entry.sample_rate
    assert local.entry.epsilon_after == pytest.approx(
        epsilon_of([(1.0, rate, 2)], delta=1e-5, accountant="rdp"), rel=1e-9
    )
    assert local.group_epsilon == pytest.approx(
        epsilon_of([(1.0, rate, 2)] * 2, delta=1e-5, accountant="rdp"), rel=1e-9
    )
    checks = recompute_ledger([entry.to_dict() for entry in ledger.entries()])
    assert all(check.agrees for check in checks)
