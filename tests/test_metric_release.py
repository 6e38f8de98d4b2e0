"""Metrics released under DP: the Gaussian mechanism's noise matches what the ledger accounts,
releases compose with training on the same data set, and a release past the cap is refused
with nothing recorded."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant

from fedtune.common.database import connect
from fedtune.privacy import metric_release
from fedtune.privacy.accounting import BudgetExhaustedError, epsilon_of
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.entry_check import EntryCheck
from fedtune.privacy.ledger import sign_checkpoint
from fedtune.privacy.ledger_file import verify_ledger_file, write_ledger_file
from fedtune.privacy.ledger_store import create_ledger_tables
from fedtune.privacy.metric_release import noise_std, release_mean
from fedtune.privacy.node_ledger import NodeLedger

HELD_OUT = "sha256:" + "e" * 64
TRAIN = "sha256:" + "a" * 64


def release(ledger: NodeLedger, values, *, noise=lambda std: 0.0, cap=50.0, sigma=5.0, bound=4.0):
    return release_mean(
        values,
        bound=bound,
        noise_multiplier=sigma,
        ledger=ledger,
        data_fingerprint=HELD_OUT,
        base_model_fingerprint="sha256:" + "f" * 64,
        run_id="run-1",
        round_number=1,
        cap=cap,
        delta=1e-5,
        accountant="rdp",
        noise=noise,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> NodeLedger:
    return NodeLedger(tmp_path / "state", node="hospital")


def test_values_are_clipped_and_the_noise_is_the_sensitivity_times_the_multiplier(ledger):
    asked: list[float] = []

    def noise(std: float) -> float:
        asked.append(std)
        return 0.0

    released = release(ledger, [1.0, 2.0, 9.0, -3.0, math.nan], noise=noise, bound=4.0)

    # clipped to [0, 4]: 1 + 2 + 4 + 0 + 4 (a non-finite value counts as the bound) over 5
    assert released.mean == pytest.approx(11.0 / 5) and released.count == 5
    # the row (value / bound, 1) has L2 norm <= sqrt(2): each sum gets 5 * sqrt(2), which is
    # 5 * 4 * sqrt(2) on the unscaled sum
    assert asked == [pytest.approx(5.0 * math.sqrt(2.0))] * 2
    assert released.noise_std == noise_std(bound=4.0, noise_multiplier=5.0)


def test_the_ledger_entry_accounts_one_gaussian_mechanism_with_that_multiplier(ledger):
    released = release(ledger, [1.0] * 100, sigma=5.0)
    entry = released.entry

    assert (entry.kind, entry.method, entry.privacy_unit) == (
        "metric_release",
        "gaussian",
        "example",
    )
    assert (entry.steps, entry.sample_rate, entry.noise_multiplier) == (1, 1.0, 5.0)
    assert entry.data_fingerprint == HELD_OUT
    assert entry.max_grad_norm == pytest.approx(math.sqrt(2.0))  # one example's row, in L2
    independent = RdpAccountant()
    independent.compose(GaussianDpEvent(5.0))
    assert entry.epsilon_round == pytest.approx(independent.get_epsilon(1e-5), rel=0.02)
    assert all(r.agrees for r in recompute_ledger([entry.to_dict()]) if not r.skipped)


def test_the_systems_noise_has_the_asked_standard_deviation():
    draws = [metric_release._system_noise(3.0) for _ in range(20_000)]

    assert statistics.fmean(draws) == pytest.approx(0.0, abs=0.1)
    assert statistics.stdev(draws) == pytest.approx(3.0, rel=0.03)


def test_releases_compose_with_the_data_sets_other_private_entries(ledger):
    first = release(ledger, [1.0] * 10).entry
    second = release(ledger, [1.0] * 10).entry

    assert second.epsilon_after == pytest.approx(
        epsilon_of([(5.0, 1.0, 1), (5.0, 1.0, 1)], delta=1e-5, accountant="rdp")
    )
    assert second.epsilon_after > first.epsilon_after


def test_a_release_past_the_cap_is_refused_and_nothing_is_recorded(ledger):
    release(ledger, [1.0] * 10, cap=1.0)  # one costs 0.79 at sigma 5, two 1.16
    before = ledger.entries()

    with pytest.raises(BudgetExhaustedError, match=r"past its cap 1 "):
        release(ledger, [1.0] * 10, cap=1.0)

    assert ledger.entries() == before


def test_a_ledger_with_releases_exports_and_verifies(ledger, tmp_path):
    release(ledger, [1.0] * 10)
    entries = ledger.entries()
    path = tmp_path / "l.jsonl"
    write_ledger_file(
        path,
        node="hospital",
        public_key=ledger.key.public_key,
        entries=entries,
        checkpoint=sign_checkpoint(node="hospital", head=entries[-1], key=ledger.key),
    )

    result = verify_ledger_file(path, public_key=ledger.key.public_key)

    assert result.ok and result.summary["data_sets"][HELD_OUT]["metric_releases"] == 1


def test_a_release_cannot_pass_for_a_training_round_at_the_coordinator(ledger, tmp_path):
    """A node that sends its release's entry in a train reply would make a round look cheap."""
    released = release(ledger, [1.0] * 10)
    engine = connect(f"sqlite:///{tmp_path / 'coordinator.db'}")
    create_ledger_tables(engine)
    check = EntryCheck(engine=engine, run_id="run-1", enrolled={"hospital": ledger.key.public_key})

    as_training = check.problem(1, "hospital", released.entry, released.checkpoint)
    as_release = check.problem(
        1, "hospital", released.entry, released.checkpoint, kind="metric_release"
    )

    assert as_training == "it records a metric_release, and this reply a training_round"
    assert as_release is None
