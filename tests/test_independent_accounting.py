import random

import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant
from opacus.accountants import RDPAccountant

from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.audit.independent_accounting import (
    OPACUS_RDP_ORDERS,
    PLD_DISCRETIZATION,
    recompute_ledger,
)

DELTA = 1e-5
# (data set, run, noise multiplier, sample rate, steps): two data sets, two runs, rounds
# with different parameters, interleaved as a node's ledger would hold them.
PLAN = [
    ("sha256:hospital", "run-1", 1.1, 0.02, 20),
    ("sha256:bank", "run-1", 2.0, 0.01, 50),
    ("sha256:hospital", "run-1", 1.1, 0.02, 20),
    ("sha256:bank", "run-1", 1.5, 0.03, 30),
    ("sha256:hospital", "run-2", 0.9, 0.05, 10),
    ("sha256:hospital", "run-2", 1.3, 0.04, 25),
]


def ledger(plan=PLAN, *, accountant="rdp", node="hospital-node"):
    """Entries whose epsilons come from Opacus, composed per data set across runs."""
    entries, histories = [], {}
    for seq, (data, run, sigma, q, steps) in enumerate(plan):
        history = histories.setdefault(data, [])
        history.append((sigma, q, steps))
        entries.append(
            {
                "seq": seq,
                "node": node,
                "run_id": run,
                "round": len(history),
                "base_model_fingerprint": "sha256:base",
                "data_fingerprint": data,
                "mode": "dp",
                "steps": steps,
                "sample_rate": q,
                "noise_multiplier": sigma,
                "max_grad_norm": 1.0,
                "delta": DELTA,
                "epsilon_round": epsilon_of(
                    [(sigma, q, steps)], delta=DELTA, accountant=accountant
                ),
                "epsilon_after": epsilon_of(history, delta=DELTA, accountant=accountant),
                "epsilon_cap": 8.0,
                "accountant": accountant,
                "accountant_version": "opacus-1.6.0",
                "kind": "training_round",
                "method": "dp-sgd",
                "privacy_unit": "example",
                "recorded_at": f"2026-01-01T00:{seq:02d}:00Z",
            }
        )
    return entries


def non_private(seq, data="sha256:hospital"):
    return {
        "seq": seq,
        "node": "hospital-node",
        "run_id": "run-2",
        "round": 9,
        "data_fingerprint": data,
        "mode": "non-private",
        "steps": 20,
        "sample_rate": 0.02,
        "noise_multiplier": None,
        "max_grad_norm": None,
        "delta": None,
        "epsilon_round": None,
        "epsilon_after": None,
        "epsilon_cap": None,
        "accountant": None,
    }


def test_the_recorded_rdp_orders_are_opacus_orders():
    assert list(OPACUS_RDP_ORDERS) == [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


def test_opacus_rdp_epsilons_agree_with_dp_accounting_across_runs_and_data_sets():
    entries = ledger()

    results = recompute_ledger(entries)

    assert [r.seq for r in results] == [e["seq"] for e in entries]
    assert all(r.agrees for r in results), [r.note for r in results if not r.agrees]
    assert max(abs(r.relative_difference) for r in results) < 1e-3
    assert {r.method.split()[-1] for r in results} == {"rdp"}


def test_rdp_agrees_to_a_millionth_where_the_best_order_is_an_integer():
    # sigma 2, q 0.01: Opacus' best RDP orders are integers, where both libraries are exact.
    entries = ledger(
        [("sha256:bank", "run-1", 2.0, 0.01, 50), ("sha256:bank", "run-1", 2.0, 0.01, 50)]
    )

    results = recompute_ledger(entries)

    for result in results:
        assert result.recomputed_epsilon == pytest.approx(result.stored_epsilon, rel=1e-9)
        assert result.recomputed_epsilon_round == pytest.approx(
            result.stored_epsilon_round, rel=1e-9
        )


def test_a_halved_epsilon_after_is_reported_as_disagreeing():
    entries = ledger()
    entries[4]["epsilon_after"] /= 2

    results = recompute_ledger(entries)

    assert [r.seq for r in results if not r.agrees] == [4]
    assert "epsilon_after" in results[4].note
    assert results[4].relative_difference == pytest.approx(1.0, rel=1e-3)


def test_a_tampered_epsilon_round_is_reported_as_disagreeing():
    entries = ledger()
    entries[1]["epsilon_round"] *= 0.9

    results = recompute_ledger(entries)

    assert [r.seq for r in results if not r.agrees] == [1]
    assert "epsilon_round" in results[1].note


def test_an_epsilon_that_forgets_the_earlier_run_disagrees():
    entries = ledger()
    run_2_only = [(0.9, 0.05, 10), (1.3, 0.04, 25)]
    entries[5]["epsilon_after"] = epsilon_of(run_2_only, delta=DELTA, accountant="rdp")

    results = recompute_ledger(entries)

    assert [r.seq for r in results if not r.agrees] == [5]


def test_a_prv_entry_is_recomputed_with_pld_within_its_tolerance():
    entries = ledger(PLAN[:3], accountant="prv")

    results = recompute_ledger(entries)

    assert all(r.agrees for r in results), [r.note for r in results]
    assert all(r.method.endswith(" pld") for r in results)
    assert all(r.tolerance.kind == "absolute" for r in results)
    # Opacus reports PRV's upper bound, about its eps_error (0.01) above PLD's estimate.
    assert all(0 < r.stored_epsilon - r.recomputed_epsilon < 0.02 for r in results)


def test_a_halved_prv_epsilon_is_reported_as_disagreeing():
    entries = ledger(PLAN[:3], accountant="prv")
    entries[2]["epsilon_after"] /= 2

    results = recompute_ledger(entries)

    assert [r.agrees for r in results] == [True, True, False]


def test_the_pld_replay_matches_dp_accountings_pld_accountant():
    entries = ledger(PLAN[:3], accountant="prv")
    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, steps in [(1.1, 0.02, 20), (1.1, 0.02, 20)]:
        accountant.compose(
            SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
        )

    results = recompute_ledger(entries)

    assert results[2].recomputed_epsilon == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)


def test_non_private_entries_are_skipped_and_leave_the_history_alone():
    entries = ledger()
    entries.insert(3, non_private(seq=100))
    for seq, entry in enumerate(entries):
        entry["seq"] = seq

    results = recompute_ledger(entries)

    assert results[3].skipped
    assert results[3].agrees is None
    assert "non-private" in results[3].note
    assert all(r.agrees for r in results if not r.skipped)


def test_results_follow_the_order_of_the_entries_given():
    entries = ledger()
    shuffled = entries[:]
    random.Random(3).shuffle(shuffled)

    results = recompute_ledger(shuffled)

    assert [r.seq for r in results] == [e["seq"] for e in shuffled]
    assert all(r.agrees for r in results)


@pytest.mark.parametrize(
    "field", ["noise_multiplier", "sample_rate", "steps", "delta", "epsilon_after", "accountant"]
)
def test_a_missing_parameter_names_the_entry_and_the_field(field):
    entries = ledger(PLAN[:2])
    del entries[1][field]

    with pytest.raises(ValueError, match=rf"seq 1: missing {field}"):
        recompute_ledger(entries)


def test_an_invalid_parameter_is_refused_with_its_value():
    entries = ledger(PLAN[:2])
    entries[0]["sample_rate"] = 1.5

    with pytest.raises(ValueError, match=r"seq 0: sample_rate must be in \(0, 1\], got 1.5"):
        recompute_ledger(entries)


def test_two_entries_with_one_seq_are_refused():
    entries = ledger(PLAN[:2])
    entries[1]["seq"] = 0

    with pytest.raises(ValueError, match="seq 0"):
        recompute_ledger(entries)
