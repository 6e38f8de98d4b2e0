"""The budget guard: over any sequence of rounds, a data set never passes its epsilon cap, a
round that fits is never refused, and what was spent survives restarts (the node's ledger)."""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.privacy.accounting import BudgetExhaustedError, epsilon_of
from fedtune.privacy.budget_guard import check_round
from fedtune.privacy.node_ledger import NodeLedger

DELTA = 1e-5
DATA = "sha256:data"

rounds = st.lists(
    st.tuples(
        st.floats(min_value=0.6, max_value=4.0),  # noise multiplier
        st.floats(min_value=0.005, max_value=0.2),  # sample rate
        st.integers(min_value=1, max_value=60),  # steps
    ),
    min_size=1,
    max_size=8,
)


def ledger_fields(planned: tuple, *, after: float, cap: float, number: int) -> dict:
    sigma, rate, steps = planned
    return {
        "run_id": "property",
        "round": number,
        "base_model_fingerprint": "sha256:model",
        "data_fingerprint": DATA,
        "mode": "dp",
        "steps": steps,
        "sample_rate": rate,
        "noise_multiplier": sigma,
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "epsilon_round": epsilon_of([planned], delta=DELTA, accountant="rdp"),
        "epsilon_after": after,
        "epsilon_cap": cap,
        "accountant": "rdp",
        "accountant_version": "opacus-test",
        "kind": "training_round",
        "method": "dp-sgd",
        "privacy_unit": "example",
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proposed=rounds, cap=st.floats(min_value=0.3, max_value=10.0))
def test_the_cap_is_never_passed_and_a_round_that_fits_is_never_refused(proposed, cap):
    with tempfile.TemporaryDirectory() as state_dir:
        for number, planned in enumerate(proposed, start=1):
            # A new NodeLedger each round: the node restarts between rounds.
            ledger = NodeLedger(Path(state_dir), node="hospital")
            history = ledger.dp_history(DATA)
            fits = epsilon_of([*history, planned], delta=DELTA, accountant="rdp") <= cap
            try:
                after = check_round(history, planned, cap=cap, delta=DELTA, accountant="rdp")
            except BudgetExhaustedError:
                assert not fits, "a round that fits was refused"
                continue
            assert fits, "a round past the cap was allowed"
            ledger.append(ledger_fields(planned, after=after, cap=cap, number=number))

        spent = NodeLedger(Path(state_dir), node="hospital").dp_history(DATA)
        assert epsilon_of(spent, delta=DELTA, accountant="rdp") <= cap


def test_a_declined_round_names_what_was_spent_and_the_cap():
    history = [(1.0, 0.1, 50)]

    with pytest.raises(BudgetExhaustedError, match=r"past its cap 2 \(delta 1e-05, RDP\)"):
        check_round(history, (1.0, 0.1, 50), cap=2.0, delta=DELTA, accountant="rdp")
